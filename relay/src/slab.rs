//! A slab whose handles carry a generation, so that a handle to a removed value never
//! reaches the value that later takes its place. Sessions and Z-HOP flows live in one;
//! their handles ([`SessionSlot`]) travel through epoll tokens and io_uring user data.

/// A handle to a slab entry: a DoubleHop session's slot (naming its exit-facing socket) or
/// a Z-HOP peer's or flow's. The generation tells a recycled slot from the value that used
/// it before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionSlot {
    pub index: u32,
    pub generation: u32,
}

impl SessionSlot {
    /// Packs the slot into one integer, for epoll tokens and io_uring user data.
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
    pub fn from_u64(v: u64) -> Self {
        SessionSlot {
            index: v as u32,
            generation: (v >> 32) as u32,
        }
    }
}

#[derive(Debug)]
struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

/// Values addressed by [`SessionSlot`]; freed indices are reused with a new generation.
#[derive(Debug)]
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the highest index ever used (the range a sweep walks).
    pub fn index_bound(&self) -> u32 {
        self.entries.len() as u32
    }

    /// The index the next [`Slab::insert`] will use.
    pub fn next_index(&self) -> u32 {
        self.free
            .last()
            .copied()
            .unwrap_or(self.entries.len() as u32)
    }

    pub fn insert(&mut self, value: T) -> SessionSlot {
        let index = self.free.pop().unwrap_or_else(|| {
            self.entries.push(Entry {
                generation: 0,
                value: None,
            });
            (self.entries.len() - 1) as u32
        });
        let e = &mut self.entries[index as usize];
        e.generation = e.generation.wrapping_add(1);
        e.value = Some(value);
        self.len += 1;
        SessionSlot {
            index,
            generation: e.generation,
        }
    }

    pub fn get(&self, slot: SessionSlot) -> Option<&T> {
        self.entries
            .get(slot.index as usize)
            .filter(|e| e.generation == slot.generation)
            .and_then(|e| e.value.as_ref())
    }

    pub fn get_mut(&mut self, slot: SessionSlot) -> Option<&mut T> {
        self.entries
            .get_mut(slot.index as usize)
            .filter(|e| e.generation == slot.generation)
            .and_then(|e| e.value.as_mut())
    }

    /// The value at `index`, whatever its generation, with its current handle.
    pub fn at(&self, index: u32) -> Option<(SessionSlot, &T)> {
        let e = self.entries.get(index as usize)?;
        let v = e.value.as_ref()?;
        Some((
            SessionSlot {
                index,
                generation: e.generation,
            },
            v,
        ))
    }

    pub fn at_mut(&mut self, index: u32) -> Option<(SessionSlot, &mut T)> {
        let e = self.entries.get_mut(index as usize)?;
        let generation = e.generation;
        let v = e.value.as_mut()?;
        Some((SessionSlot { index, generation }, v))
    }

    pub fn remove(&mut self, slot: SessionSlot) -> Option<T> {
        let e = self
            .entries
            .get_mut(slot.index as usize)
            .filter(|e| e.generation == slot.generation)?;
        let v = e.value.take()?;
        self.free.push(slot.index);
        self.len -= 1;
        Some(v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (SessionSlot, &T)> + '_ {
        (0..self.index_bound()).filter_map(|i| self.at(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_handles_miss_the_new_value() {
        let mut s = Slab::default();
        let a = s.insert("a");
        assert_eq!(s.get(a), Some(&"a"));
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(b.index, a.index, "index reused");
        assert_ne!(b.generation, a.generation);
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.at(a.index), Some((b, &"b")));
        assert_eq!(s.len(), 1);
        assert_eq!(s.iter().count(), 1);
    }
}
