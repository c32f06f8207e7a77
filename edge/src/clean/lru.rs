//! A bounded map with least-recently-used eviction, for per-series and per-device state.
//!
//! Entries live in a slab (`Vec`) linked into a recency list by index; the hash map points into
//! the slab. A lookup, a touch and an eviction are O(1) and allocate nothing once the slab is
//! full: an evicted entry's slot is reused in place. Each slot has a generation, bumped when
//! it is reused, so a cached slot index (a series remembering its device's slot) can be checked
//! for staleness without hashing. Series are looked up by `(&str, &str)` without building a key,
//! through the `dyn SeriesKeyView` borrow below.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use fieldgate_shared::{DeviceId, MetricName};

const NIL: u32 = u32::MAX;

struct Slot<K, V> {
    key: K,
    value: V,
    /// Towards the most recently used.
    prev: u32,
    /// Towards the least recently used.
    next: u32,
    generation: u32,
}

pub(crate) struct Lru<K, V> {
    index: HashMap<K, u32>,
    slots: Vec<Slot<K, V>>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the next to go.
    tail: u32,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// `capacity` is at least 1 and below `u32::MAX`.
    pub(crate) fn new(capacity: usize) -> Self {
        assert!(capacity >= 1 && capacity < NIL as usize);
        Self {
            index: HashMap::new(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn find<Q>(&self, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.index.get(key).copied()
    }

    /// Whether `slot` still holds the entry it held at `generation`.
    pub(crate) fn is_current(&self, slot: u32, generation: u32) -> bool {
        self.slots
            .get(slot as usize)
            .is_some_and(|s| s.generation == generation)
    }

    pub(crate) fn generation(&self, slot: u32) -> u32 {
        self.slots[slot as usize].generation
    }

    pub(crate) fn get(&self, slot: u32) -> &V {
        &self.slots[slot as usize].value
    }

    pub(crate) fn get_mut(&mut self, slot: u32) -> &mut V {
        &mut self.slots[slot as usize].value
    }

    /// Marks `slot` as the most recently used.
    pub(crate) fn touch(&mut self, slot: u32) {
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    /// Inserts a key that is not present, as the most recently used. When full, the least
    /// recently used entry is evicted and handed back, and its slot reused.
    pub(crate) fn insert(&mut self, key: K, value: V) -> (u32, Option<(K, V)>) {
        debug_assert!(!self.index.contains_key(&key));
        if self.slots.len() < self.capacity {
            let slot = self.slots.len() as u32;
            self.slots.push(Slot {
                key: key.clone(),
                value,
                prev: NIL,
                next: NIL,
                generation: 0,
            });
            self.index.insert(key, slot);
            self.push_front(slot);
            return (slot, None);
        }
        let slot = self.tail;
        self.unlink(slot);
        let entry = &mut self.slots[slot as usize];
        let old_key = std::mem::replace(&mut entry.key, key.clone());
        let old_value = std::mem::replace(&mut entry.value, value);
        entry.generation = entry.generation.wrapping_add(1);
        self.index.remove(&old_key);
        self.index.insert(key, slot);
        self.push_front(slot);
        (slot, Some((old_key, old_value)))
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.slots
            .iter_mut()
            .map(|slot| (&slot.key, &mut slot.value))
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let s = &self.slots[slot as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next as usize].prev = prev,
        }
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        {
            let s = &mut self.slots[slot as usize];
            s.prev = NIL;
            s.next = old_head;
        }
        match old_head {
            NIL => self.tail = slot,
            old_head => self.slots[old_head as usize].prev = slot,
        }
        self.head = slot;
    }

    #[cfg(test)]
    fn keys_by_recency(&self) -> Vec<K> {
        let mut keys = Vec::new();
        let mut at = self.head;
        while at != NIL {
            keys.push(self.slots[at as usize].key.clone());
            at = self.slots[at as usize].next;
        }
        keys
    }
}

/// A series' key in the table.
#[derive(Clone, Debug)]
pub(crate) struct SeriesKey {
    pub(crate) device: DeviceId,
    pub(crate) metric: MetricName,
}

/// What a series key looks like from the outside, so `(&str, &str)` can look one up.
pub(crate) trait SeriesKeyView {
    fn device(&self) -> &str;
    fn metric(&self) -> &str;
}

impl SeriesKeyView for SeriesKey {
    fn device(&self) -> &str {
        self.device.as_str()
    }
    fn metric(&self) -> &str {
        self.metric.as_str()
    }
}

impl SeriesKeyView for (&str, &str) {
    fn device(&self) -> &str {
        self.0
    }
    fn metric(&self) -> &str {
        self.1
    }
}

impl Hash for dyn SeriesKeyView + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.device().hash(state);
        self.metric().hash(state);
    }
}

impl PartialEq for dyn SeriesKeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.device() == other.device() && self.metric() == other.metric()
    }
}

impl Eq for dyn SeriesKeyView + '_ {}

// Hash and equality of the owned key must be those of the view, for `Borrow` to be sound.
impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self as &dyn SeriesKeyView).hash(state);
    }
}

impl PartialEq for SeriesKey {
    fn eq(&self, other: &Self) -> bool {
        (self as &dyn SeriesKeyView) == (other as &dyn SeriesKeyView)
    }
}

impl Eq for SeriesKey {}

impl<'a> Borrow<dyn SeriesKeyView + 'a> for SeriesKey {
    fn borrow(&self) -> &(dyn SeriesKeyView + 'a) {
        self
    }
}

/// A device's key in the table, looked up by `&str`.
#[derive(Clone, Debug)]
pub(crate) struct DeviceKey(pub(crate) DeviceId);

impl Hash for DeviceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}

impl PartialEq for DeviceKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for DeviceKey {}

impl Borrow<str> for DeviceKey {
    fn borrow(&self) -> &str {
        self.0.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut lru: Lru<u32, &str> = Lru::new(3);
        let (a, _) = lru.insert(1, "a");
        lru.insert(2, "b");
        lru.insert(3, "c");
        assert_eq!(lru.keys_by_recency(), [3, 2, 1]);
        lru.touch(a);
        assert_eq!(lru.keys_by_recency(), [1, 3, 2]);
        let generation = lru.generation(a);
        let (slot, evicted) = lru.insert(4, "d");
        assert_eq!(evicted, Some((2, "b")));
        assert_eq!(lru.keys_by_recency(), [4, 1, 3]);
        assert_eq!(lru.find(&2), None);
        assert_eq!(lru.find(&4), Some(slot));
        assert_eq!(*lru.get(slot), "d");
        assert!(lru.is_current(a, generation));
        // 3 goes next; then 1, whose slot's generation moves on.
        lru.insert(5, "e");
        lru.insert(6, "f");
        assert!(!lru.is_current(a, generation));
        assert_eq!(lru.keys_by_recency(), [6, 5, 4]);
        assert_eq!(lru.len(), 3);
        *lru.get_mut(slot) = "D";
        assert_eq!(*lru.get(lru.find(&4).unwrap()), "D");
    }

    #[test]
    fn a_capacity_of_one_works() {
        let mut lru: Lru<u32, u32> = Lru::new(1);
        lru.insert(1, 10);
        let (slot, evicted) = lru.insert(2, 20);
        assert_eq!((slot, evicted), (0, Some((1, 10))));
        lru.touch(slot);
        assert_eq!(lru.keys_by_recency(), [2]);
    }

    #[test]
    fn series_are_found_by_borrowed_names() {
        let mut lru: Lru<SeriesKey, u32> = Lru::new(4);
        let key = SeriesKey {
            device: DeviceId::new("plc1").unwrap(),
            metric: MetricName::new("temp").unwrap(),
        };
        let (slot, _) = lru.insert(key, 7);
        assert_eq!(
            lru.find(&("plc1", "temp") as &dyn SeriesKeyView),
            Some(slot)
        );
        assert_eq!(lru.find(&("plc1", "tem") as &dyn SeriesKeyView), None);
        assert_eq!(lru.find(&("plc", "1temp") as &dyn SeriesKeyView), None);
        let mut devices: Lru<DeviceKey, u32> = Lru::new(2);
        let (slot, _) = devices.insert(DeviceKey(DeviceId::new("plc1").unwrap()), 1);
        assert_eq!(devices.find("plc1"), Some(slot));
    }
}
