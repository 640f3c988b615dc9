// TEMPORARY STAND-IN until the helper's topk.rs lands.
use std::{collections::HashMap, hash::Hash};
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<K> {
    pub key: K,
    pub count: u64,
    pub error: u64,
}
#[derive(Debug)]
pub struct TopK<K> {
    counts: HashMap<K, u64>,
}
impl<K: Eq + Hash + Clone> TopK<K> {
    pub fn new(_capacity: usize) -> Self {
        Self {
            counts: HashMap::new(),
        }
    }
    pub fn observe(&mut self, key: &K, weight: u64) {
        *self.counts.entry(key.clone()).or_default() += weight;
    }
    pub fn top(&self, n: usize) -> Vec<Entry<K>> {
        let mut v: Vec<_> = self
            .counts
            .iter()
            .map(|(k, c)| Entry {
                key: k.clone(),
                count: *c,
                error: 0,
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count));
        v.truncate(n);
        v
    }
}
#[derive(Debug)]
pub struct BoundedGauges<K> {
    gauges: HashMap<K, u64>,
}
impl<K: Eq + Hash + Clone> BoundedGauges<K> {
    pub fn new(_capacity: usize) -> Self {
        Self {
            gauges: HashMap::new(),
        }
    }
    pub fn increment(&mut self, key: &K) {
        *self.gauges.entry(key.clone()).or_default() += 1;
    }
    pub fn decrement(&mut self, key: &K) {
        if let Some(v) = self.gauges.get_mut(key) {
            *v -= 1;
            if *v == 0 {
                self.gauges.remove(key);
            }
        }
    }
    pub fn top(&self, n: usize) -> Vec<(K, u64)> {
        let mut v: Vec<_> = self.gauges.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1));
        v.truncate(n);
        v
    }
    pub fn overflow(&self) -> u64 {
        0
    }
}
