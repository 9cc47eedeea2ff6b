//! Workload specifications: `PATTERN[:key=value,...]`, e.g. `hotcold:ws=512M,write=0.3,seed=7`.

use std::fmt;
use std::str::FromStr;

/// How the guest picks the page of each step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pattern {
    /// Pages in address order, wrapping around.
    Sequential,
    /// Uniformly random pages.
    Uniform,
    /// A share `hot_pages` of the pages receives a share `hot_access` of the accesses.
    HotCold { hot_pages: f64, hot_access: f64 },
}

/// A workload: pattern, working-set size, write ratio and seed.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    pub pattern: Pattern,
    /// Working-set size in bytes; 0 means all guest memory the workload can use.
    pub ws_bytes: u64,
    /// Share of steps that write the page after verifying it (every step verifies).
    pub write_ratio: f64,
    pub seed: u64,
}

/// Errors of workload specifications.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    #[error("unknown workload pattern '{0}': use seq, uniform or hotcold (e.g. hotcold:ws=512M,write=0.3,seed=7)")]
    Pattern(String),
    #[error("unknown workload option '{0}': options are ws=SIZE, write=RATIO, seed=N, hot=RATIO, hotaccess=RATIO")]
    Option(String),
    #[error("bad value '{value}' for workload option '{key}': {why}")]
    Value {
        key: String,
        value: String,
        why: String,
    },
    #[error("working set of {ws} bytes does not fit: at most {max} bytes fit in this guest; raise --mem or lower ws")]
    WorkingSetTooLarge { ws: u64, max: u64 },
    #[error("{vcpus} vCPUs: the built-in guest runs 1 to {max}")]
    Vcpus { vcpus: u32, max: usize },
}

/// Parses a size such as `4096`, `64K`, `512M`, `1G`, `2GiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; write e.g. 512M, 1G or 4096"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_ratio(key: &str, v: &str) -> Result<f64, WorkloadError> {
    let bad = |why: &str| WorkloadError::Value {
        key: key.into(),
        value: v.into(),
        why: why.into(),
    };
    let r: f64 = v.parse().map_err(|_| bad("not a number; write e.g. 0.3"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(bad("must be between 0 and 1"));
    }
    Ok(r)
}

impl FromStr for WorkloadSpec {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, opts) = s.split_once(':').unwrap_or((s, ""));
        let mut spec = WorkloadSpec {
            pattern: match name.trim() {
                "seq" | "sequential" => Pattern::Sequential,
                "uniform" | "random" => Pattern::Uniform,
                "hotcold" => Pattern::HotCold {
                    hot_pages: 0.1,
                    hot_access: 0.9,
                },
                other => return Err(WorkloadError::Pattern(other.into())),
            },
            ws_bytes: 0,
            write_ratio: 0.3,
            seed: 1,
        };
        for kv in opts.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| WorkloadError::Option(kv.into()))?;
            match (k, &mut spec.pattern) {
                ("ws", _) => {
                    spec.ws_bytes = parse_size(v).map_err(|why| WorkloadError::Value {
                        key: k.into(),
                        value: v.into(),
                        why,
                    })?;
                }
                ("write", _) => spec.write_ratio = parse_ratio(k, v)?,
                ("seed", _) => {
                    spec.seed = v.parse().map_err(|_| WorkloadError::Value {
                        key: k.into(),
                        value: v.into(),
                        why: "not an unsigned integer".into(),
                    })?;
                }
                ("hot", Pattern::HotCold { hot_pages, .. }) => *hot_pages = parse_ratio(k, v)?,
                ("hotaccess", Pattern::HotCold { hot_access, .. }) => {
                    *hot_access = parse_ratio(k, v)?
                }
                _ => return Err(WorkloadError::Option(k.into())),
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for WorkloadSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pattern {
            Pattern::Sequential => write!(f, "seq:")?,
            Pattern::Uniform => write!(f, "uniform:")?,
            Pattern::HotCold {
                hot_pages,
                hot_access,
            } => write!(f, "hotcold:hot={hot_pages},hotaccess={hot_access},")?,
        }
        if self.ws_bytes > 0 {
            write!(f, "ws={},", self.ws_bytes)?;
        }
        write!(f, "write={},seed={}", self.write_ratio, self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_examples() {
        let w: WorkloadSpec = "hotcold:ws=512M,write=0.3,seed=7".parse().unwrap();
        assert_eq!(w.ws_bytes, 512 << 20);
        assert_eq!(w.seed, 7);
        assert!(matches!(w.pattern, Pattern::HotCold { .. }));
        assert_eq!(w.to_string().parse::<WorkloadSpec>().unwrap(), w);
        let w: WorkloadSpec = "seq".parse().unwrap();
        assert_eq!(w.pattern, Pattern::Sequential);
    }

    #[test]
    fn rejects_bad_input_with_a_hint() {
        let e = "zigzag:ws=1M".parse::<WorkloadSpec>().unwrap_err();
        assert!(e.to_string().contains("use seq, uniform or hotcold"));
        let e = "uniform:write=1.5".parse::<WorkloadSpec>().unwrap_err();
        assert!(e.to_string().contains("between 0 and 1"));
        let e = "uniform:ws=lots".parse::<WorkloadSpec>().unwrap_err();
        assert!(e.to_string().contains("512M"));
        assert!("uniform:hot=0.2".parse::<WorkloadSpec>().is_err());
        assert!("uniform:bogus".parse::<WorkloadSpec>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1.5G").is_err());
    }
}
