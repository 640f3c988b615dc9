//! Bounded heavy hitters for keys of unbounded cardinality (client addresses, domains):
//! Space-Saving (Metwally, Agrawal, El Abbadi 2005) over an indexed min-heap, so each
//! observation costs O(log capacity) and memory never exceeds `capacity` keys. Counts are
//! exact while the distinct keys fit; past that a key that takes the place of another
//! inherits the other's count as its error, and any key seen more than total/capacity times
//! is tracked. The list shows what is certain: the count since a key was tracked, a lower
//! bound of the true count, and the error, by which the true count may exceed it.

use std::{collections::HashMap, hash::Hash, time::Duration};

/// A tracked key: the true count lies in `[count - error, count]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<K> {
    pub key: K,
    pub count: u64,
    pub error: u64,
}

/// A key as listed: the true count lies in `[count, count + error]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed<K> {
    pub key: K,
    /// Counted since the key was tracked: never more than the true count.
    pub count: u64,
    /// How much more the true count may be: what the key it replaced had counted, and
    /// where lists were merged, what a key one of them did not track may have had there.
    pub error: u64,
}

/// The heaviest keys of a stream, in bounded memory.
#[derive(Debug)]
pub struct TopK<K: Eq + Hash + Clone> {
    capacity: usize,
    /// Min-heap by count: the root is the key to replace.
    heap: Vec<Entry<K>>,
    /// Key → position in `heap`.
    position: HashMap<K, usize>,
    /// A key has been replaced: keys not tracked may have been seen.
    replaced: bool,
}

impl<K: Eq + Hash + Clone> TopK<K> {
    /// Tracks at most `capacity` keys (at least one).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            heap: Vec::with_capacity(capacity),
            position: HashMap::with_capacity(capacity),
            replaced: false,
        }
    }

    /// Forgets every key, as if new.
    pub fn clear(&mut self) {
        self.heap.clear();
        self.position.clear();
        self.replaced = false;
    }

    /// How many keys it tracks at most.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds `weight` to `key`. A new key arriving when full replaces the smallest, inheriting
    /// its count as error bound.
    pub fn observe(&mut self, key: &K, weight: u64) {
        if let Some(&at) = self.position.get(key) {
            self.heap[at].count = self.heap[at].count.saturating_add(weight);
            self.sift_down(at);
        } else if self.heap.len() < self.capacity {
            self.heap.push(Entry {
                key: key.clone(),
                count: weight,
                error: 0,
            });
            let at = self.heap.len() - 1;
            self.position.insert(key.clone(), at);
            self.sift_up(at);
        } else {
            let smallest = self.heap[0].count;
            self.replaced = true;
            self.position.remove(&self.heap[0].key);
            self.heap[0] = Entry {
                key: key.clone(),
                count: smallest.saturating_add(weight),
                error: smallest,
            };
            self.position.insert(key.clone(), 0);
            self.sift_down(0);
        }
    }

    /// The `n` heaviest keys by their certain count (the count since tracked, a lower bound
    /// of the true one), highest first; ranked as [`top_of`] ranks.
    #[must_use]
    pub fn top(&self, n: usize) -> Vec<Listed<K>>
    where
        K: Ord,
    {
        top_of(&[self], n)
    }

    /// What a key not tracked may have had: the smallest tracked count once a key was
    /// replaced (every key replaced had at most that), nothing before (every key seen is
    /// tracked).
    fn untracked_bound(&self) -> u64 {
        if self.replaced {
            self.heap.first().map_or(0, |smallest| smallest.count)
        } else {
            0
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        for at in [a, b] {
            if let Some(slot) = self.position.get_mut(&self.heap[at].key) {
                *slot = at;
            }
        }
    }

    fn sift_up(&mut self, mut at: usize) {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.heap[parent].count <= self.heap[at].count {
                break;
            }
            self.swap(parent, at);
            at = parent;
        }
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let mut smallest = at;
            for child in [2 * at + 1, 2 * at + 2] {
                if child < self.heap.len() && self.heap[child].count < self.heap[smallest].count {
                    smallest = child;
                }
            }
            if smallest == at {
                break;
            }
            self.swap(at, smallest);
            at = smallest;
        }
    }
}

/// How long each window of a [`RecentTopK`] counts: its lists show the last one to two of
/// these, where a list since the start shows, after weeks, the same keys whatever happens
/// now.
pub const RECENT_WINDOW: Duration = Duration::from_mins(5);

/// The heaviest keys of late: a list for the window being counted and one for the window
/// before it ([`RECENT_WINDOW`] each), the pair moved on at the first poll past the
/// window's end.
#[derive(Debug)]
pub struct RecentTopK<K: Eq + Hash + Clone> {
    /// The window before, once one ended.
    previous: Option<Window<K>>,
    current: Window<K>,
}

#[derive(Debug)]
struct Window<K: Eq + Hash + Clone> {
    keys: TopK<K>,
    /// When it began, on the caller's clock.
    began: Duration,
    /// What the caller had lost since its start when it began.
    lost_before: u64,
}

/// A [`RecentTopK`]'s list at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentListed<K> {
    /// The heaviest keys; each `error` leaves out what was lost (`lost`).
    pub top: Vec<Listed<K>>,
    /// Of what the caller lost since its start, what it lost since the list began.
    pub lost: u64,
    /// How far back the list reaches.
    pub reach: Duration,
}

impl<K: Eq + Hash + Clone + Ord> RecentTopK<K> {
    /// Tracks up to `capacity` keys in each window. The first window begins at zero on the
    /// caller's clock, with nothing lost: it holds all the caller counts until it ends.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            previous: None,
            current: Window {
                keys: TopK::new(capacity),
                began: Duration::ZERO,
                lost_before: 0,
            },
        }
    }

    /// Adds `weight` to `key` in the window being counted.
    pub fn observe(&mut self, key: &K, weight: u64) {
        self.current.keys.observe(key, weight);
    }

    /// The `n` heaviest keys of both windows at a poll at `now` (the caller's clock, which
    /// only goes forward), having lost `lost` since its start (items it could not count,
    /// which the caller's bounds widen by). Call after the poll's observations: a window
    /// that ends here keeps them. After polls that stalled, the window that ended reaches
    /// back to where it began.
    pub fn top(&mut self, n: usize, now: Duration, lost: u64) -> RecentListed<K> {
        if now.saturating_sub(self.current.began) >= RECENT_WINDOW {
            // The retired window's memory, emptied, counts the next one.
            let mut keys = self.previous.take().map_or_else(
                || TopK::new(self.current.keys.capacity()),
                |retired| retired.keys,
            );
            keys.clear();
            let next = Window {
                keys,
                began: now,
                lost_before: lost,
            };
            self.previous = Some(std::mem::replace(&mut self.current, next));
        }
        let oldest = self.previous.as_ref().unwrap_or(&self.current);
        let lists: Vec<&TopK<K>> = self
            .previous
            .iter()
            .chain([&self.current])
            .map(|window| &window.keys)
            .collect();
        RecentListed {
            top: top_of(&lists, n),
            lost: lost.saturating_sub(oldest.lost_before),
            reach: now.saturating_sub(oldest.began),
        }
    }
}

/// The `n` heaviest keys of `lists`, each the list of one stretch of a stream (a window of
/// time): a key's certain count is the sum of its certain counts where it is tracked, and it
/// may have had more by its errors there and, where it is not, by what a key not tracked
/// may have had. Highest certain count first; then by the estimate, then by key, so that the
/// order does not change from one snapshot to the next. Ranked by the estimate, a long tail
/// of keys seen once, each inheriting the evicted minimum, filled the list with counts in the
/// hundreds above keys truly seen ten times.
#[must_use]
pub fn top_of<K: Eq + Hash + Clone + Ord>(lists: &[&TopK<K>], n: usize) -> Vec<Listed<K>> {
    let certain = |entry: &Entry<K>| entry.count - entry.error;
    // Each key once, where the first list that tracks it lists it, its counts in the later
    // lists looked up where they are: no map of every key is built (one list: its entries).
    let mut listed: Vec<Listed<&K>> = Vec::new();
    for (at, list) in lists.iter().enumerate() {
        let (earlier, later) = (&lists[..at], &lists[at + 1..]);
        for entry in &list.heap {
            if earlier
                .iter()
                .any(|earlier| earlier.position.contains_key(&entry.key))
            {
                continue;
            }
            let mut merged = Listed {
                key: &entry.key,
                count: certain(entry),
                error: entry.error,
            };
            for other in earlier {
                merged.error = merged.error.saturating_add(other.untracked_bound());
            }
            for other in later {
                if let Some(&there) = other.position.get(&entry.key) {
                    let there = &other.heap[there];
                    merged.count = merged.count.saturating_add(certain(there));
                    merged.error = merged.error.saturating_add(there.error);
                } else {
                    merged.error = merged.error.saturating_add(other.untracked_bound());
                }
            }
            listed.push(merged);
        }
    }
    let order = |a: &Listed<&K>, b: &Listed<&K>| {
        b.count
            .cmp(&a.count)
            .then(b.error.cmp(&a.error))
            .then_with(|| a.key.cmp(b.key))
    };
    // The first `n` found before any sorting: the lists may track 100,000 keys each.
    if listed.len() > n {
        listed.select_nth_unstable_by(n, order);
        listed.truncate(n);
    }
    listed.sort_unstable_by(order);
    listed
        .into_iter()
        .map(|listed| Listed {
            key: listed.key.clone(),
            count: listed.count,
            error: listed.error,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_exact_while_keys_fit() {
        let mut top = TopK::new(4);
        for (key, times) in [("a", 5), ("b", 3), ("c", 9)] {
            for _ in 0..times {
                top.observe(&key, 1);
            }
        }
        top.observe(&"d", 2);
        let entries = top.top(10);
        let got: Vec<(&str, u64, u64)> =
            entries.iter().map(|e| (e.key, e.count, e.error)).collect();
        assert_eq!(got, [("c", 9, 0), ("a", 5, 0), ("b", 3, 0), ("d", 2, 0)]);
        assert_eq!(top.heap.len(), 4);
        assert_eq!(top.top(1)[0].key, "c");
    }

    #[test]
    fn heavy_hitters_survive_a_long_tail_within_their_error_bounds() {
        // A Zipf-like stream: key i appears about 10000 / (i + 1) times, 2000 keys, interleaved.
        let mut truth: HashMap<u32, u64> = HashMap::new();
        let mut top = TopK::new(50);
        let mut state = 12_345u64;
        for _ in 0..200_000 {
            // xorshift: deterministic pseudo-random ranks with a 1/(i+1) law via rejection.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let candidate = u32::try_from(state % 2000).unwrap();
            if !state.is_multiple_of(u64::from(candidate + 1)) {
                continue;
            }
            *truth.entry(candidate).or_default() += 1;
            top.observe(&candidate, 1);
        }
        let mut exact: Vec<(u32, u64)> = truth.into_iter().collect();
        exact.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let reported = top.top(50);
        for (key, true_count) in exact.iter().take(10) {
            let entry = reported
                .iter()
                .find(|e| e.key == *key)
                .unwrap_or_else(|| panic!("heavy hitter {key} ({true_count}) missing"));
            assert!(entry.count <= *true_count && *true_count <= entry.count + entry.error);
        }
        assert_eq!(top.heap.len(), 50);
    }

    /// The merge against a plain one over a map of every key (as it was first written),
    /// over three lists of random streams that replace keys.
    #[test]
    fn merged_lists_agree_with_a_plain_merge() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let lists: Vec<TopK<u64>> = (0..3)
                .map(|_| {
                    let mut list = TopK::new(8);
                    for _ in 0..next() % 60 {
                        list.observe(&(next() % 20), next() % 5 + 1);
                    }
                    list
                })
                .collect();
            let lists: Vec<&TopK<u64>> = lists.iter().collect();
            assert_eq!(top_of(&lists, 12), plain_merge(&lists, 12), "round {round}");
        }
    }

    fn plain_merge(lists: &[&TopK<u64>], n: usize) -> Vec<Listed<u64>> {
        let mut merged: HashMap<u64, Listed<u64>> = HashMap::new();
        for list in lists {
            for entry in &list.heap {
                let listed = merged.entry(entry.key).or_insert(Listed {
                    key: entry.key,
                    count: 0,
                    error: 0,
                });
                listed.count += entry.count - entry.error;
                listed.error += entry.error;
            }
        }
        let mut all: Vec<Listed<u64>> = merged
            .into_values()
            .map(|mut listed| {
                for list in lists {
                    if !list.position.contains_key(&listed.key) {
                        listed.error += list.untracked_bound();
                    }
                }
                listed
            })
            .collect();
        all.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(b.error.cmp(&a.error))
                .then(a.key.cmp(&b.key))
        });
        all.truncate(n);
        all
    }

    #[test]
    fn lists_of_two_stretches_add_up_and_bound_what_one_left_out() {
        let mut earlier = TopK::new(2);
        earlier.observe(&"a", 5);
        earlier.observe(&"b", 3);
        // Full: "c" takes b's place with b's 3 as its error.
        earlier.observe(&"c", 1);
        let mut later = TopK::new(2);
        later.observe(&"a", 2);
        later.observe(&"d", 4);
        let got: Vec<(&str, u64, u64)> = top_of(&[&earlier, &later], 10)
            .iter()
            .map(|e| (e.key, e.count, e.error))
            .collect();
        // d: not tracked earlier, where an untracked key had at most 4 (the smallest, c's).
        // c: 1 certain and 3 more possible earlier; later, full but never replacing a key,
        // saw none.
        assert_eq!(got, [("a", 7, 0), ("d", 4, 4), ("c", 1, 3)]);
        // A list alone, as it tracks them.
        let alone: Vec<(&str, u64, u64)> = earlier
            .top(10)
            .iter()
            .map(|e| (e.key, e.count, e.error))
            .collect();
        assert_eq!(alone, [("a", 5, 0), ("c", 1, 3)]);
        assert_eq!(top_of(&[&earlier, &later], 1)[0].key, "a");
    }

    #[test]
    fn replacement_inherits_the_smallest_count_as_error() {
        let mut top = TopK::new(2);
        top.observe(&"a", 5);
        top.observe(&"b", 2);
        top.observe(&"c", 1);
        let c = top.top(2).into_iter().find(|e| e.key == "c").unwrap();
        assert_eq!((c.count, c.error), (1, 2));
        assert!(top.top(2).iter().all(|e| e.key != "b"));
    }

    #[test]
    fn keys_seen_once_list_as_once_below_a_heavy_key_that_came_late() {
        let mut top = TopK::new(100);
        for i in 0..20_000u32 {
            top.observe(&i, 1);
            // Heavier than one in the table's size: tracked from its first time on.
            if i >= 10_000 && i % 50 == 0 {
                top.observe(&u32::MAX, 1);
            }
        }
        let listed = top.top(10);
        assert_eq!((listed[0].key, listed[0].count), (u32::MAX, 200));
        assert!(listed[0].error > 0);
        // Each of the rest was seen once: listed as once, not as the minimum it inherited.
        assert!(
            listed[1..]
                .iter()
                .all(|entry| entry.count == 1 && entry.error > 100),
            "{listed:?}"
        );
    }
}
