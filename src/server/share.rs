//! A bounded number of places (open connections, open streams) of which no
//! single uid may hold more than its share, so one local user, even one the
//! policy denies everything, cannot take them all from everyone else.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Places in use, in total and by uid. `None` counts peers whose uid is
/// unknown together, as one more user.
#[derive(Debug)]
pub struct Shares {
    total: usize,
    per_uid: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    by_uid: HashMap<Option<u32>, usize>,
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Every place is taken.
    Total(usize),
    /// This uid holds its whole share.
    Share(usize),
}

impl Full {
    /// The bound reached and the `*_connections` key that sets it, for the
    /// refusal's log line.
    pub fn limit_and_key(self) -> (usize, &'static str) {
        match self {
            Full::Total(n) => (n, "max_connections"),
            Full::Share(n) => (n, "max_connections_per_uid"),
        }
    }
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Place {
    shares: Arc<Shares>,
    uid: Option<u32>,
}

impl Shares {
    pub fn new(total: usize, per_uid: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_uid: per_uid.min(total),
            taken: Mutex::new(Taken::default()),
        })
    }

    /// A place for `uid`, if the total and its share allow.
    pub fn take(self: &Arc<Self>, uid: Option<u32>) -> Result<Place, Full> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if taken.total >= self.total {
            return Err(Full::Total(self.total));
        }
        let held = taken.by_uid.entry(uid).or_default();
        if *held >= self.per_uid {
            return Err(Full::Share(self.per_uid));
        }
        *held += 1;
        taken.total += 1;
        Ok(Place {
            shares: Arc::clone(self),
            uid,
        })
    }

    /// Whether every place is taken (whoever asks next is refused).
    pub fn full(&self) -> bool {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.total >= self.total
    }

    /// Places `uid` holds now.
    #[cfg(test)]
    pub fn held_by(&self, uid: Option<u32>) -> usize {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.by_uid.get(&uid).copied().unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut taken = self.shares.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.total -= 1;
        if let Some(held) = taken.by_uid.get_mut(&self.uid) {
            *held -= 1;
            if *held == 0 {
                taken.by_uid.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_uid_cannot_take_more_than_its_share() {
        let shares = Shares::new(4, 2);
        let a1 = shares.take(Some(1)).unwrap();
        let _a2 = shares.take(Some(1)).unwrap();
        assert_eq!(shares.take(Some(1)).unwrap_err(), Full::Share(2));
        let _b1 = shares.take(Some(2)).unwrap();
        let _c1 = shares.take(None).unwrap();
        assert_eq!(shares.take(Some(3)).unwrap_err(), Full::Total(4));
        assert!(shares.full());
        drop(a1);
        assert!(!shares.full());
        assert_eq!(shares.held_by(Some(1)), 1);
        let _a3 = shares.take(Some(1)).unwrap();
        assert_eq!(shares.take(Some(1)).unwrap_err(), Full::Total(4));
    }
}
