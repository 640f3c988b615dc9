//! TCP sequence numbers (modulo 2^32) against offsets in a segment's data: where the kernel's
//! server name reader keeps a hello that goes on past its segment, and finds it again in the
//! next.
#![expect(
    clippy::inline_always,
    reason = "the kernel's reader inlines all of it, as the ClientHello parser"
)]

/// The sequence number of `offset` in a segment whose data starts at offset `data_start`
/// with sequence number `data_seq`.
#[inline(always)]
#[must_use]
pub const fn seq_at(data_seq: u32, data_start: u32, offset: u32) -> u32 {
    data_seq.wrapping_add(offset.wrapping_sub(data_start))
}

/// The offset of sequence number `seq` in a segment whose data starts at offset `data_start`
/// with sequence number `data_seq` ([`seq_at`]'s inverse).
#[inline(always)]
#[must_use]
pub const fn offset_at(data_seq: u32, data_start: u32, seq: u32) -> u32 {
    seq.wrapping_sub(data_seq).wrapping_add(data_start)
}

/// `seq` is at or after `next` (within half the sequence space, as TCP compares them): with
/// `next` a socket's next expected byte, the byte at `seq` has not arrived yet.
#[inline(always)]
#[must_use]
pub const fn at_or_after(seq: u32, next: u32) -> bool {
    seq.wrapping_sub(next).cast_signed() >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_sequence_numbers_round_trip_across_the_wrap() {
        for data_seq in [0, 1, 1_000, u32::MAX - 1_500, u32::MAX - 1, u32::MAX] {
            for data_start in [40, 52, 60, 100] {
                for offset in [data_start, data_start + 1, data_start + 1_448, 65_535] {
                    let seq = seq_at(data_seq, data_start, offset);
                    assert_eq!(
                        seq,
                        data_seq.wrapping_add(offset - data_start),
                        "{data_seq} {data_start} {offset}"
                    );
                    assert_eq!(offset_at(data_seq, data_start, seq), offset);
                }
            }
        }
        // A next segment after the wrap: the hello's next extension, 600 bytes into it.
        let first = u32::MAX - 99;
        let next_segment = seq_at(first, 52, 52 + 1_000);
        assert_eq!(next_segment, 900);
        assert_eq!(
            offset_at(next_segment, 40, seq_at(first, 52, 52 + 1_600)),
            640
        );
    }

    #[test]
    fn at_or_after_compares_within_half_the_space() {
        assert!(at_or_after(5, 5));
        assert!(at_or_after(6, 5));
        assert!(!at_or_after(4, 5));
        assert!(at_or_after(3, u32::MAX - 3));
        assert!(!at_or_after(u32::MAX - 3, 3));
        assert!(at_or_after(0x7fff_ffff, 0));
        assert!(!at_or_after(0x8000_0000, 0));
    }
}
