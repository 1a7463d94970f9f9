//! The ingress-nginx annotations kproxy implements, parsed once per Ingress into [`Settings`].
//!
//! Names are read under `nginx.ingress.kubernetes.io/` and the same names under `kproxy.io/`
//! (the kproxy prefix wins when both are set). Names under these prefixes that kproxy does not
//! implement are returned, so the caller can warn once per Ingress.

use std::collections::BTreeMap;
use std::time::Duration;

pub const NGINX_PREFIX: &str = "nginx.ingress.kubernetes.io/";
pub const KPROXY_PREFIX: &str = "kproxy.io/";
/// Cookie name for `affinity: cookie` when `session-cookie-name` is not set (ingress-nginx's).
pub const DEFAULT_COOKIE: &str = "INGRESSCOOKIE";

/// The ingress-nginx annotations kproxy reads (after the `nginx.ingress.kubernetes.io/` prefix).
pub const KNOWN: &[&str] = &[
    "rewrite-target",
    "use-regex",
    "ssl-redirect",
    "force-ssl-redirect",
    "backend-protocol",
    "proxy-body-size",
    "proxy-connect-timeout",
    "proxy-read-timeout",
    "proxy-send-timeout",
    "affinity",
    "session-cookie-name",
    "canary",
    "canary-weight",
    "canary-by-header",
];

/// Per-Ingress proxy behaviour. `Default` is what an Ingress without annotations gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Replacement for the request path when the rule's path (as a regex) matches; `$1`.. are captures.
    pub rewrite_target: Option<String>,
    /// Paths are regular expressions (ImplementationSpecific and Prefix paths), matched at the start.
    pub use_regex: bool,
    /// Redirect HTTP to HTTPS (308) when the host has TLS.
    pub ssl_redirect: bool,
    /// Redirect HTTP to HTTPS even without TLS for the host.
    pub force_ssl_redirect: bool,
    /// Speak TLS to the backend (`backend-protocol: HTTPS`); the backend's certificate is not verified, as in ingress-nginx.
    pub backend_https: bool,
    /// Largest request body accepted; `None` is unlimited.
    pub body_limit: Option<u64>,
    pub connect_timeout: Option<Duration>,
    /// Longest wait for the backend's response head, and between two reads of its body.
    pub read_timeout: Option<Duration>,
    /// Longest wait for the backend to take the next piece of the request body.
    pub send_timeout: Option<Duration>,
    /// Cookie-based session affinity: the cookie's name.
    pub affinity_cookie: Option<String>,
    pub canary: Option<Canary>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            rewrite_target: None,
            use_regex: false,
            ssl_redirect: true,
            force_ssl_redirect: false,
            backend_https: false,
            body_limit: None,
            connect_timeout: None,
            read_timeout: None,
            send_timeout: None,
            affinity_cookie: None,
            canary: None,
        }
    }
}

/// A canary Ingress: it takes part of the traffic of the main Ingress with the same host and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canary {
    /// Percentage (0-100) of requests sent to the canary.
    pub weight: u32,
    /// Requests with this header set to `always` go to the canary, `never` to the main backend.
    pub header: Option<String>,
}

/// What [`parse`] found: the settings, values it rejected, and names it does not implement.
#[derive(Debug, Default)]
pub struct Parsed {
    pub settings: Settings,
    pub errors: Vec<String>,
    pub unknown: Vec<String>,
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// nginx sizes: `0` (unlimited), `1024`, `8k`, `1m`, `1g`.
pub fn parse_size(v: &str) -> Option<Option<u64>> {
    let v = v.trim().to_ascii_lowercase();
    let (num, scale) = match v.chars().last()? {
        'k' => (&v[..v.len() - 1], 1u64 << 10),
        'm' => (&v[..v.len() - 1], 1 << 20),
        'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v.as_str(), 1),
    };
    let n: u64 = num.parse().ok()?;
    Some(if n == 0 { None } else { Some(n.checked_mul(scale)?) })
}

/// ingress-nginx timeouts are plain seconds; nginx's `10s`, `1m` are accepted too.
fn parse_timeout(v: &str) -> Option<Duration> {
    let v = v.trim();
    match v.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => crate::config::parse_duration(v),
    }
}

/// Reads the annotations of one Ingress.
pub fn parse(annotations: &BTreeMap<String, String>) -> Parsed {
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    let mut unknown = Vec::new();
    // nginx first, so a kproxy.io/ value of the same name overrides it.
    for prefix in [NGINX_PREFIX, KPROXY_PREFIX] {
        for (k, v) in annotations {
            let Some(name) = k.strip_prefix(prefix) else { continue };
            if KNOWN.contains(&name) {
                values.insert(name, v.as_str());
            } else {
                unknown.push(k.clone());
            }
        }
    }
    let mut s = Settings::default();
    let mut errors = Vec::new();
    let mut bad = |name: &str, v: &str| errors.push(format!("annotation {name}: invalid value {v:?}"));
    let mut canary = false;
    let mut canary_weight = 0;
    let mut canary_header = None;
    let mut affinity = false;
    let mut cookie = None;
    for (name, v) in values {
        match name {
            "rewrite-target" => s.rewrite_target = Some(v.to_string()),
            "use-regex" => match parse_bool(v) {
                Some(b) => s.use_regex = b,
                None => bad(name, v),
            },
            "ssl-redirect" => match parse_bool(v) {
                Some(b) => s.ssl_redirect = b,
                None => bad(name, v),
            },
            "force-ssl-redirect" => match parse_bool(v) {
                Some(b) => s.force_ssl_redirect = b,
                None => bad(name, v),
            },
            "backend-protocol" => match v.trim().to_ascii_uppercase().as_str() {
                "HTTP" => s.backend_https = false,
                "HTTPS" => s.backend_https = true,
                _ => bad(name, v),
            },
            "proxy-body-size" => match parse_size(v) {
                Some(limit) => s.body_limit = limit,
                None => bad(name, v),
            },
            "proxy-connect-timeout" | "proxy-read-timeout" | "proxy-send-timeout" => match parse_timeout(v) {
                Some(d) if !d.is_zero() => match name {
                    "proxy-connect-timeout" => s.connect_timeout = Some(d),
                    "proxy-read-timeout" => s.read_timeout = Some(d),
                    _ => s.send_timeout = Some(d),
                },
                _ => bad(name, v),
            },
            "affinity" => match v.trim() {
                "cookie" => affinity = true,
                "" => {}
                _ => bad(name, v),
            },
            "session-cookie-name" => cookie = Some(v.trim().to_string()).filter(|c| !c.is_empty()),
            "canary" => match parse_bool(v) {
                Some(b) => canary = b,
                None => bad(name, v),
            },
            "canary-weight" => match v.trim().parse::<u32>() {
                Ok(w) if w <= 100 => canary_weight = w,
                _ => bad(name, v),
            },
            "canary-by-header" => canary_header = Some(v.trim().to_string()).filter(|h| !h.is_empty()),
            _ => {}
        }
    }
    if affinity {
        s.affinity_cookie = Some(cookie.unwrap_or_else(|| DEFAULT_COOKIE.to_string()));
    }
    if canary {
        s.canary = Some(Canary {
            weight: canary_weight,
            header: canary_header,
        });
    }
    Parsed {
        settings: s,
        errors,
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn nginx_and_kproxy_prefixes_and_unknown_names() {
        let p = parse(&map(&[
            ("nginx.ingress.kubernetes.io/rewrite-target", "/$2"),
            ("nginx.ingress.kubernetes.io/ssl-redirect", "false"),
            ("kproxy.io/proxy-body-size", "8k"),
            ("nginx.ingress.kubernetes.io/proxy-body-size", "1m"),
            ("nginx.ingress.kubernetes.io/configuration-snippet", "more_set_headers"),
            ("kubernetes.io/ingress.class", "nginx"),
        ]));
        assert_eq!(p.settings.rewrite_target.as_deref(), Some("/$2"));
        assert!(!p.settings.ssl_redirect);
        assert_eq!(p.settings.body_limit, Some(8192), "kproxy.io/ wins");
        assert_eq!(p.unknown, ["nginx.ingress.kubernetes.io/configuration-snippet"]);
        assert!(p.errors.is_empty());
    }

    #[test]
    fn canary_affinity_timeouts_and_bad_values() {
        let p = parse(&map(&[
            ("nginx.ingress.kubernetes.io/canary", "true"),
            ("nginx.ingress.kubernetes.io/canary-weight", "30"),
            ("nginx.ingress.kubernetes.io/canary-by-header", "X-Canary"),
            ("nginx.ingress.kubernetes.io/affinity", "cookie"),
            ("nginx.ingress.kubernetes.io/proxy-read-timeout", "7"),
            ("nginx.ingress.kubernetes.io/proxy-connect-timeout", "nope"),
            ("nginx.ingress.kubernetes.io/backend-protocol", "GRPC"),
        ]));
        let s = &p.settings;
        assert_eq!(
            s.canary,
            Some(Canary {
                weight: 30,
                header: Some("X-Canary".into())
            })
        );
        assert_eq!(s.affinity_cookie.as_deref(), Some(DEFAULT_COOKIE));
        assert_eq!(s.read_timeout, Some(Duration::from_secs(7)));
        assert_eq!(s.connect_timeout, None);
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
    }

    /// Found by the `annotations` fuzz target: a timeout too long for a `Duration` once
    /// panicked the route builder, so one Ingress stopped every Ingress update.
    #[test]
    fn a_timeout_too_long_for_a_duration_is_an_error() {
        let huge = "100000000000000000000000000000000000000007173733806442603407s";
        for name in ["proxy-connect-timeout", "proxy-read-timeout", "proxy-send-timeout"] {
            for prefix in ["nginx.ingress.kubernetes.io/", "kproxy.io/"] {
                let key = format!("{prefix}{name}");
                let p = parse(&map(&[(key.as_str(), huge)]));
                assert_eq!(p.errors.len(), 1, "{prefix}{name}: {:?}", p.errors);
                assert_eq!(p.settings.connect_timeout, None);
                assert_eq!(p.settings.read_timeout, None);
                assert_eq!(p.settings.send_timeout, None);
            }
        }
        assert_eq!(crate::config::parse_duration("99999999999999999999999h"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Some(None));
        assert_eq!(parse_size("100"), Some(Some(100)));
        assert_eq!(parse_size("2M"), Some(Some(2 << 20)));
        assert_eq!(parse_size("x"), None);
    }
}
