//! Which cameras a worker should claim, keep and give up, from a snapshot of the buckets
//! (pure: no broker, no clock). Cameras spread evenly: no worker holds more than
//! ceil(cameras / live workers), nor more than its own `max_streams`.

use std::collections::{BTreeMap, BTreeSet};

/// What one worker sees at one poll.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub me: String,
    /// The cameras wanted (their KV keys).
    pub desired: BTreeSet<String>,
    /// Camera key -> the worker whose lease on it is live (this one's included).
    pub holders: BTreeMap<String, String>,
    /// Workers with a live heartbeat, this one included.
    pub live_workers: usize,
    pub max_streams: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free cameras to try to lease, best first.
    pub claim: Vec<String>,
    /// Held cameras to give up: no longer wanted, or over this worker's share.
    pub release: Vec<String>,
}

/// The most cameras one worker should hold.
pub fn share(desired: usize, live_workers: usize, max_streams: usize) -> usize {
    desired.div_ceil(live_workers.max(1)).min(max_streams)
}

/// A stable per-worker order over keys, so that workers starting together try different free
/// cameras first instead of all racing for the same one.
fn rank(me: &str, key: &str) -> u64 {
    // FNV-1a over "me/key".
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in me.bytes().chain([b'/']).chain(key.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub fn plan(v: &View) -> Plan {
    let mine: Vec<&String> = v
        .holders
        .iter()
        .filter(|(_, w)| **w == v.me)
        .map(|(k, _)| k)
        .collect();
    let mut release: Vec<String> = mine
        .iter()
        .filter(|k| !v.desired.contains(**k))
        .map(|k| (*k).clone())
        .collect();
    let kept: Vec<&String> = mine
        .into_iter()
        .filter(|k| v.desired.contains(*k))
        .collect();
    let fair = share(v.desired.len(), v.live_workers, v.max_streams);
    let mut claim = Vec::new();
    if kept.len() > fair {
        // One at a time: the others pick it up at their next poll, then the shares are
        // recomputed. The highest-ranked go first, so the choice is stable between polls.
        let mut by_rank = kept.clone();
        by_rank.sort_by_key(|k| std::cmp::Reverse(rank(&v.me, k)));
        release.push(by_rank[0].clone());
    } else {
        let mut free: Vec<&String> = v
            .desired
            .iter()
            .filter(|k| !v.holders.contains_key(*k))
            .collect();
        free.sort_by_key(|k| rank(&v.me, k));
        claim = free.into_iter().take(fair - kept.len()).cloned().collect();
    }
    Plan { claim, release }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(me: &str, desired: &[&str], holders: &[(&str, &str)], live: usize) -> View {
        View {
            me: me.into(),
            desired: desired.iter().map(|s| s.to_string()).collect(),
            holders: holders
                .iter()
                .map(|(k, w)| (k.to_string(), w.to_string()))
                .collect(),
            live_workers: live,
            max_streams: usize::MAX,
        }
    }

    #[test]
    fn shares_are_ceil_of_cameras_over_workers_capped_by_max_streams() {
        assert_eq!(share(3, 2, 10), 2);
        assert_eq!(share(4, 2, 10), 2);
        assert_eq!(share(5, 0, 10), 5);
        assert_eq!(share(5, 1, 3), 3);
        assert_eq!(share(0, 3, 3), 0);
    }

    #[test]
    fn a_lone_worker_claims_every_free_camera_and_none_that_is_held() {
        let p = plan(&view("a", &["c1", "c2", "c3"], &[("c2", "b")], 1));
        let mut c = p.claim.clone();
        c.sort();
        // Share 3, one held by b (its lease is live even if its heartbeat is not yet seen).
        assert_eq!(c, ["c1", "c3"]);
        assert!(p.release.is_empty());
    }

    #[test]
    fn three_cameras_on_two_workers_spread_two_and_one() {
        // a holds all three when b joins: a gives one up, b takes it.
        let holders = [("c1", "a"), ("c2", "a"), ("c3", "a")];
        let p = plan(&view("a", &["c1", "c2", "c3"], &holders, 2));
        assert_eq!(p.release.len(), 1);
        assert!(p.claim.is_empty());
        let released = p.release[0].clone();
        let after: Vec<(&str, &str)> = holders
            .iter()
            .copied()
            .filter(|(k, _)| *k != released)
            .collect();
        let pa = plan(&view("a", &["c1", "c2", "c3"], &after, 2));
        assert_eq!(pa, Plan::default(), "a is at its share of 2");
        let pb = plan(&view("b", &["c1", "c2", "c3"], &after, 2));
        assert_eq!(pb.claim, vec![released]);
    }

    #[test]
    fn a_dead_workers_cameras_are_claimed_once_its_leases_expire() {
        // b died: its lease on c3 expired, its heartbeat too.
        let p = plan(&view(
            "a",
            &["c1", "c2", "c3"],
            &[("c1", "a"), ("c2", "a")],
            1,
        ));
        assert_eq!(p.claim, ["c3"]);
    }

    #[test]
    fn a_removed_camera_is_released_and_max_streams_caps_claims() {
        let mut v = view("a", &["c2", "c3", "c4"], &[("c1", "a")], 1);
        v.max_streams = 2;
        let p = plan(&v);
        assert_eq!(p.release, ["c1"]);
        assert_eq!(p.claim.len(), 2);
    }

    #[test]
    fn workers_try_free_cameras_in_different_orders() {
        let desired: Vec<String> = (0..8).map(|i| format!("cam{i}")).collect();
        let d: Vec<&str> = desired.iter().map(|s| s.as_str()).collect();
        let a = plan(&view("worker-a", &d, &[], 4));
        let b = plan(&view("worker-b", &d, &[], 4));
        assert_eq!((a.claim.len(), b.claim.len()), (2, 2));
        assert_ne!(a.claim, b.claim);
    }
}
