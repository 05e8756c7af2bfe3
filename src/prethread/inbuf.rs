//! The bytes read from one connection and not yet parsed.
//!
//! A peer that pipelines (a client sending many messages without waiting,
//! a relay streaming frames) leaves many whole messages in one read. Taking
//! each off the front of a plain `Vec` moves everything behind it, so a
//! buffer of `n` small messages cost O(n²) bytes copied: at the buffer's
//! cap (one whole message of the largest size) that was a mebibyte moved
//! per 100-byte chat message. Here taking a message only advances an
//! offset; the unparsed tail moves to the front only when the bytes taken
//! are at least as many as the ones left (or the vector would otherwise
//! grow), so each byte is moved at most once on average.

/// Unparsed bytes of one connection: `data[start..]`.
#[derive(Default)]
pub(crate) struct InBuf {
    data: Vec<u8>,
    /// Bytes at the front of `data` already taken.
    start: usize,
}

impl InBuf {
    /// Bytes not yet taken.
    pub fn len(&self) -> usize {
        self.data.len().saturating_sub(self.start)
    }

    /// Whether every byte read has been taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes not yet taken.
    pub fn unread(&self) -> &[u8] {
        self.data.get(self.start..).unwrap_or_default()
    }

    /// Appends bytes just read, first moving the unread tail to the front
    /// when that is cheap (the taken prefix is at least as long) or saves
    /// a reallocation.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0
            && (self.start >= self.len()
                || self.data.len().saturating_add(bytes.len()) > self.data.capacity())
        {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.extend_from_slice(bytes);
    }

    /// Takes `n` bytes off the front (at most what is there). When nothing
    /// is left the memory goes back: an idle connection holds none.
    pub fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.data.len());
        if self.start >= self.data.len() {
            *self = InBuf::default();
        }
    }

    /// The unread bytes as a vector of their own (for a handler taking
    /// the raw socket over); the buffer is left empty.
    pub fn take(&mut self) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.data);
        data.drain(..self.start.min(data.len()));
        self.start = 0;
        data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_and_keeps_order_across_compaction() {
        let mut b = InBuf::default();
        let mut model: Vec<u8> = Vec::new();
        let mut next = 0u8;
        for round in 0..2_000usize {
            let add: Vec<u8> = (0..(round % 37))
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            b.extend(&add);
            model.extend_from_slice(&add);
            assert_eq!(b.unread(), &model[..]);
            let take = (round * 7) % 23;
            b.consume(take);
            model.drain(..take.min(model.len()));
            assert_eq!(b.unread(), &model[..]);
            assert_eq!(b.len(), model.len());
        }
        assert_eq!(b.take(), model);
        assert!(b.is_empty());
    }

    #[test]
    fn an_emptied_buffer_holds_no_memory() {
        let mut b = InBuf::default();
        b.extend(&[1; 1000]);
        b.consume(400);
        b.consume(600);
        assert!(b.is_empty());
        assert_eq!(b.data.capacity(), 0);
        b.extend(&[2; 10]);
        b.consume(1_000_000);
        assert!(b.is_empty());
    }

    #[test]
    fn many_small_messages_do_not_move_the_tail_each_time() {
        // 10,000 messages of 100 bytes in one buffer: taking them one by
        // one must not shift the rest every time (a drain per message
        // would move ~500 MB here).
        let mut b = InBuf::default();
        b.extend(&vec![7u8; 1_000_000]);
        let ptr = b.unread().as_ptr() as usize;
        for _ in 0..9_999 {
            b.consume(100);
        }
        // Still the same allocation, 100 bytes before its end.
        assert_eq!(b.unread().as_ptr() as usize, ptr + 999_900);
        assert_eq!(b.len(), 100);
    }
}
