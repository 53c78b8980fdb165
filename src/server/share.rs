//! A bounded number of places (open connections, open streams) of which no
//! single uid may hold more than its share, so one local user, even one the
//! policy denies everything, cannot take them all from everyone else. A
//! caller from another network namespace (a pod reaching the metadata
//! endpoint on the node's address) has no uid here: its share is counted by
//! its source address instead, so one pod cannot take every place either.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Who a place is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sharer {
    /// A local peer by its uid; `None` counts peers whose uid is unknown
    /// together, as one more user.
    Uid(Option<u32>),
    /// A peer known only by its source address (a pod's IP).
    Address(IpAddr),
}

/// `uid 1000`, `uid unknown`, `pod address 10.0.0.7`: who, in refusals.
impl std::fmt::Display for Sharer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sharer::Uid(Some(uid)) => write!(f, "uid {uid}"),
            Sharer::Uid(None) => f.write_str("uid unknown"),
            Sharer::Address(ip) => write!(f, "pod address {ip}"),
        }
    }
}

impl From<Option<u32>> for Sharer {
    fn from(uid: Option<u32>) -> Self {
        Sharer::Uid(uid)
    }
}

/// Places in use, in total and by [`Sharer`].
#[derive(Debug)]
pub struct Shares {
    total: usize,
    per_uid: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    total: usize,
    by_uid: HashMap<Sharer, usize>,
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
    uid: Sharer,
}

impl Shares {
    pub fn new(total: usize, per_uid: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_uid: per_uid.min(total),
            taken: Mutex::new(Taken::default()),
        })
    }

    /// A place for `uid` (or a source address), if the total and its share
    /// allow.
    pub fn take(self: &Arc<Self>, uid: impl Into<Sharer>) -> Result<Place, Full> {
        let uid = uid.into();
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
    pub fn held_by(&self, uid: impl Into<Sharer>) -> usize {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.by_uid.get(&uid.into()).copied().unwrap_or(0)
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

    #[test]
    fn a_source_address_has_a_share_of_its_own() {
        let shares = Shares::new(6, 2);
        let pod: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let _p1 = shares.take(Sharer::Address(pod)).unwrap();
        let _p2 = shares.take(Sharer::Address(pod)).unwrap();
        // A flood from one pod stops at its share; others still get in.
        assert_eq!(
            shares.take(Sharer::Address(pod)).unwrap_err(),
            Full::Share(2)
        );
        let _o = shares.take(Sharer::Address(other)).unwrap();
        let _u = shares.take(None).unwrap();
        assert_eq!(shares.held_by(Sharer::Address(pod)), 2);
        // An address is not a uid: unknown-uid peers keep their own share.
        assert_eq!(shares.held_by(None), 1);
    }
}
