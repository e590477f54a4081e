//! Parsers for command-line values that need more than a type: durations
//! with bounds, and the `--pod-labels` keys. Each refuses bad input with a
//! message clap prints as one line after the flag's name.

use std::time::Duration;

/// A duration (`15s`, `1m30s`, `500ms`) between `min` and `max`.
///
/// The bounds keep the agent sane: a zero refresh interval would spin a
/// core, and a duration of centuries overflows the clock arithmetic of the
/// timers that use it.
pub fn duration_between(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration such as 15s, 1m30s or 500ms ({e})"))?;
    if d < min {
        return Err(format!(
            "{} is too short: the least is {}",
            humantime::format_duration(d),
            humantime::format_duration(min)
        ));
    }
    if d > max {
        return Err(format!(
            "{} is too long: the most is {}",
            humantime::format_duration(d),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);

/// `--refresh-interval` and `--rescan-interval`: 100 ms (tests run the
/// background work that often) to 1 day.
pub fn interval(s: &str) -> Result<Duration, String> {
    duration_between(s, Duration::from_millis(100), DAY)
}

/// `--grace-period` and `--metadata-wait`: 0 to 1 day.
pub fn wait(s: &str) -> Result<Duration, String> {
    duration_between(s, Duration::ZERO, DAY)
}

/// `--auth-cache-ttl`: 1 s to 1 h (a revoked token is refused at most this
/// long after).
pub fn auth_ttl(s: &str) -> Result<Duration, String> {
    duration_between(s, SECOND, 3600 * SECOND)
}

/// `--watchdog-timeout`: 5 s to 1 day.
pub fn watchdog(s: &str) -> Result<Duration, String> {
    duration_between(s, 5 * SECOND, DAY)
}

/// `--remove-pins-with`: `namespace/name` of a Kubernetes object.
pub fn namespaced(s: &str) -> Result<(String, String), String> {
    let valid = |p: &str| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    match s.trim().split_once('/') {
        Some((ns, name)) if valid(ns) && valid(name) => Ok((ns.to_owned(), name.to_owned())),
        _ => Err(format!(
            "{s:?} is not NAMESPACE/NAME (lower-case names, e.g. monitoring/podmeter)"
        )),
    }
}

/// One `--pod-labels` key: a Kubernetes label key (`[prefix/]name`, at most
/// 316 bytes), which becomes the label `label_<key sanitised>`.
pub fn label_key(s: &str) -> Result<String, String> {
    let key = s.trim();
    if key.is_empty() {
        return Err("an empty label key (two commas in a row, or a trailing comma?)".into());
    }
    // Kubernetes: a prefix of up to 253 and a name of up to 63 characters.
    if key.len() > 253 + 1 + 63 {
        return Err(format!(
            "{key:?} is longer than a Kubernetes label key can be"
        ));
    }
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    if let Some(c) = key.chars().find(|&c| !valid(c)) {
        return Err(format!(
            "{key:?} is not a Kubernetes label key: {c:?} is not a letter, digit, '-', '_', '.' or '/'"
        ));
    }
    Ok(key.to_owned())
}

/// A Kubernetes label key as a Prometheus label name (`app.kubernetes.io/name`
/// → `app_kubernetes_io_name`), as kube-state-metrics does.
pub fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Refuses keys that would give two labels the same name (`a.b` and `a_b`
/// both become `label_a_b`).
pub fn distinct_label_names(keys: &[String]) -> Result<(), String> {
    let mut seen: Vec<(String, &str)> = Vec::with_capacity(keys.len());
    for key in keys {
        let name = label_name(key);
        if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
            return Err(format!(
                "--pod-labels {first:?} and {key:?} both become the label label_{name}"
            ));
        }
        seen.push((name, key));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_within_bounds() {
        assert_eq!(interval("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(interval("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(wait("0s"), Ok(Duration::ZERO));
        let e = interval("0s").unwrap_err();
        assert_eq!(e, "0s is too short: the least is 100ms");
        let e = interval("50ms").unwrap_err();
        assert!(e.contains("too short"), "{e}");
        let e = interval("1000years").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let e = interval("fast").unwrap_err();
        assert!(e.starts_with("\"fast\" is not a duration"), "{e}");
        assert!(!e.contains('\n'));
        let e = watchdog("1s").unwrap_err();
        assert!(e.contains("the least is 5s"), "{e}");
    }

    #[test]
    fn namespaced_names() {
        assert_eq!(
            namespaced("monitoring/podmeter"),
            Ok(("monitoring".into(), "podmeter".into()))
        );
        for bad in ["podmeter", "/podmeter", "ns/", "Ns/x", "a/b/c"] {
            let e = namespaced(bad).unwrap_err();
            assert!(e.contains("is not NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn label_keys() {
        assert_eq!(
            label_key("app.kubernetes.io/name").as_deref(),
            Ok("app.kubernetes.io/name")
        );
        assert!(label_key("").unwrap_err().contains("empty"));
        assert!(label_key("a b").unwrap_err().contains("' '"));
        assert!(label_key(&"x".repeat(400)).unwrap_err().contains("longer"));
        let keys = [
            "team".to_owned(),
            "app.name".to_owned(),
            "app_name".to_owned(),
        ];
        let e = distinct_label_names(&keys).unwrap_err();
        assert_eq!(
            e,
            "--pod-labels \"app.name\" and \"app_name\" both become the label label_app_name"
        );
        assert!(distinct_label_names(&keys[..2]).is_ok());
    }
}
