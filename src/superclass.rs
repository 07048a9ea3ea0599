//! Super-classes for Mobile V-MoE's router: a dense model's confusion matrix on held-out
//! clips becomes a graph (classes joined by how often they are mistaken for each other), and
//! agglomerative clustering with average linkage cuts it into one group per expert. Router
//! expert j is trained towards group j.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub const FILE: &str = "superclasses.json";

#[derive(Debug, thiserror::Error)]
pub enum SuperclassError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: malformed super-class file: {error}")]
    Json {
        path: String,
        error: serde_json::Error,
    },
    #[error("super-classes: {0}")]
    Invalid(String),
}

/// Groups of class names, one per router expert, and how they were made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Superclasses {
    pub groups: Vec<Vec<String>>,
    /// Where the groups came from (e.g. the baseline model and its held-out clips).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The confusion matrix they were clustered from: row = true class, column = predicted,
    /// in `labels` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

impl Superclasses {
    /// The super-class of every label in `labels` order; an error names a label that is in
    /// no group or in two, a group for no label, or more groups than `experts`.
    pub fn index(&self, labels: &[String], experts: usize) -> Result<Vec<usize>, SuperclassError> {
        let bad = |m: String| Err(SuperclassError::Invalid(m));
        if self.groups.len() > experts {
            return bad(format!(
                "{} groups but the router has {experts} experts",
                self.groups.len()
            ));
        }
        let mut of = vec![None; labels.len()];
        for (g, group) in self.groups.iter().enumerate() {
            if group.is_empty() {
                return bad(format!("group {g} is empty"));
            }
            for name in group {
                let Some(i) = labels.iter().position(|l| l == name) else {
                    return bad(format!(
                        "`{name}` (group {g}) is not one of the model's classes"
                    ));
                };
                if let Some(other) = of[i] {
                    return bad(format!("`{name}` is in groups {other} and {g}"));
                }
                of[i] = Some(g);
            }
        }
        of.iter()
            .zip(labels)
            .map(|(g, l)| {
                g.ok_or_else(|| SuperclassError::Invalid(format!("`{l}` is in no group")))
            })
            .collect()
    }

    pub fn read(path: &Path) -> Result<Self, SuperclassError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| SuperclassError::Io {
            path: p.clone(),
            error,
        })?;
        serde_json::from_str(&text).map_err(|error| SuperclassError::Json { path: p, error })
    }

    pub fn write(&self, path: &Path) -> Result<(), SuperclassError> {
        let p = path.display().to_string();
        let text = serde_json::to_string_pretty(self).map_err(|error| SuperclassError::Json {
            path: p.clone(),
            error,
        })?;
        std::fs::write(path, text + "\n").map_err(|error| SuperclassError::Io { path: p, error })
    }
}

/// Symmetric affinity between classes: the mean of the two confusion rates, i -> j and
/// j -> i, each a fraction of the true class's clips. The diagonal is 0.
pub fn affinity(confusion: &[Vec<u64>]) -> Vec<Vec<f64>> {
    let n = confusion.len();
    let rate = |i: usize, j: usize| {
        let total: u64 = confusion[i].iter().sum();
        confusion[i][j] as f64 / total.max(1) as f64
    };
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    if i == j {
                        0.0
                    } else {
                        (rate(i, j) + rate(j, i)) / 2.0
                    }
                })
                .collect()
        })
        .collect()
}

/// Agglomerative clustering with average linkage of a symmetric affinity matrix into `k`
/// groups (each a sorted list of class indices, groups ordered by their first class): merge
/// the two groups with the highest mean pairwise affinity until `k` remain. Ties merge the
/// pair with the lowest indices. With `k` at least the number of classes every class is
/// its own group.
pub fn cluster(aff: &[Vec<f64>], k: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = (0..aff.len()).map(|i| vec![i]).collect();
    let link = |a: &[usize], b: &[usize]| {
        let sum: f64 = a
            .iter()
            .flat_map(|&i| b.iter().map(move |&j| aff[i][j]))
            .sum();
        sum / (a.len() * b.len()) as f64
    };
    while groups.len() > k.max(1) {
        let mut best = (f64::NEG_INFINITY, 0, 1);
        for a in 0..groups.len() {
            for b in a + 1..groups.len() {
                let s = link(&groups[a], &groups[b]);
                if s > best.0 {
                    best = (s, a, b);
                }
            }
        }
        let (_, a, b) = best;
        let merged = groups.remove(b);
        groups[a].extend(merged);
        groups[a].sort_unstable();
    }
    groups.sort_by_key(|g| g[0]);
    groups
}

/// Super-classes from a confusion matrix (row = true class) over `labels`.
pub fn from_confusion(
    confusion: &[Vec<u64>],
    labels: &[String],
    experts: usize,
    source: String,
) -> Superclasses {
    let groups = cluster(&affinity(confusion), experts)
        .into_iter()
        .map(|g| g.into_iter().map(|i| labels[i].clone()).collect())
        .collect();
    Superclasses {
        groups,
        source: Some(source),
        confusion: confusion.to_vec(),
        labels: labels.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn classes_that_are_confused_end_up_together() {
        // 0<->3 and 1<->2 are often mistaken for each other; 4 is never confused.
        let c = vec![
            vec![80, 0, 1, 19, 0],
            vec![0, 70, 30, 0, 0],
            vec![2, 25, 73, 0, 0],
            vec![15, 0, 0, 85, 0],
            vec![0, 1, 0, 0, 99],
        ];
        let a = affinity(&c);
        assert!((a[0][3] - (0.19 + 0.15) / 2.0).abs() < 1e-12);
        assert_eq!(a[0][3], a[3][0]);
        assert_eq!(cluster(&a, 3), vec![vec![0, 3], vec![1, 2], vec![4]]);
        assert_eq!(
            cluster(&a, 5),
            vec![vec![0], vec![1], vec![2], vec![3], vec![4]]
        );
        assert_eq!(cluster(&a, 9).len(), 5);
        let sc = from_confusion(&c, &names(5), 2, "test".into());
        assert_eq!(sc.groups.len(), 2);
        assert_eq!(sc.index(&names(5), 2).unwrap().len(), 5);
    }

    #[test]
    fn average_linkage_uses_every_pair_not_the_closest_one() {
        // Single linkage would chain 0-1-2 (0.5 each step); average linkage joins 3 to the
        // pair {0, 1} only if its mean affinity is the highest left.
        let a = vec![
            vec![0.0, 0.5, 0.0, 0.0],
            vec![0.5, 0.0, 0.45, 0.0],
            vec![0.0, 0.45, 0.0, 0.3],
            vec![0.0, 0.0, 0.3, 0.0],
        ];
        // After {0,1}: link({0,1},2) = 0.225 < link(2,3) = 0.3.
        assert_eq!(cluster(&a, 2), vec![vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn a_bad_file_is_named_precisely() {
        let labels = names(3);
        let sc = |groups: Vec<Vec<&str>>| Superclasses {
            groups: groups
                .into_iter()
                .map(|g| g.into_iter().map(String::from).collect())
                .collect(),
            source: None,
            confusion: Vec::new(),
            labels: Vec::new(),
        };
        let err = |s: Superclasses, e| s.index(&labels, e).unwrap_err().to_string();
        assert!(err(sc(vec![vec!["c0", "c1"]]), 4).contains("`c2` is in no group"));
        assert!(err(sc(vec![vec!["c0", "c1"], vec!["c1", "c2"]]), 4).contains("groups 0 and 1"));
        assert!(err(sc(vec![vec!["c0"], vec!["x"], vec!["c1", "c2"]]), 4).contains("`x`"));
        assert!(err(sc(vec![vec!["c0"], vec!["c1"], vec!["c2"]]), 2).contains("2 experts"));
        assert_eq!(
            sc(vec![vec!["c2", "c0"], vec!["c1"]])
                .index(&labels, 4)
                .unwrap(),
            vec![0, 1, 0]
        );
        let dir = std::env::temp_dir().join(format!("mone-sc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.json"), "{ groups: ").unwrap();
        let e = Superclasses::read(&dir.join("bad.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.json") && e.contains("malformed"), "{e}");
        let good = sc(vec![vec!["c0", "c2"], vec!["c1"]]);
        good.write(&dir.join("ok.json")).unwrap();
        assert_eq!(Superclasses::read(&dir.join("ok.json")).unwrap(), good);
        std::fs::remove_dir_all(&dir).ok();
    }
}
