//! `--metrics` on `ims-crs` and `ims-ms`: `GET /metrics` is parsed by a
//! Prometheus exposition-format parser, and the counters move as a login
//! (and a failed one) happens; anything else is a 404.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Client, Crs, CrsOpts, Ms, TestEnv};

const PW: &str = "correct horse";

/// The metrics address a server logged ("metrics on http://ADDR/metrics").
fn metrics_addr(log: &str) -> SocketAddr {
    let at = log
        .find("metrics on http://")
        .unwrap_or_else(|| panic!("no metrics address in the log: {log}"));
    let rest = &log[at + "metrics on http://".len()..];
    let addr = rest.split("/metrics").next().unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|e| panic!("bad metrics address {addr:?}: {e}"))
}

/// One HTTP GET; the status line and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// Scrapes and parses; every sample as (name, labels, value).
fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text ends with EOF");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the exposition parses");
    assert!(!scrape.samples.is_empty(), "{body}");
    scrape
}

/// The value of the sample named `name` (no labels), panicking if absent.
fn value(s: &prometheus_parse::Scrape, name: &str) -> f64 {
    use prometheus_parse::Value::*;
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name)
        .unwrap_or_else(|| {
            panic!(
                "no {name} in {:?}",
                s.samples.iter().map(|x| &x.metric).collect::<Vec<_>>()
            )
        });
    match sample.value {
        Counter(v) | Gauge(v) | Untyped(v) => v,
        _ => panic!("{name} is not a plain value"),
    }
}

#[test]
fn metrics_parse_and_move_with_a_login() {
    let env = TestEnv::new();
    let crs = Crs::start(
        &env,
        CrsOpts {
            args: vec!["--metrics".into(), "127.0.0.1:0".into()],
            ..Default::default()
        },
    );
    let ms = Ms::try_start(&env, crs.addr, &env.key, &["--metrics", "127.0.0.1:0"])
        .unwrap_or_else(|e| panic!("the MS did not start: {e:?}"));
    let crs_m = metrics_addr(&crs.proc.log_text());
    let ms_m = metrics_addr(&ms.log_text());

    let before_crs = scrape(crs_m);
    let before_ms = scrape(ms_m);
    assert_eq!(value(&before_crs, "ims_crs_online_users"), 0.0);
    assert_eq!(value(&before_crs, "ims_crs_enrolled_ms"), 1.0);
    assert_eq!(value(&before_ms, "ims_ms_online_users"), 0.0);
    let logins_crs = value(&before_crs, "ims_crs_logins_total");
    let logins_ms = value(&before_ms, "ims_ms_logins_total");
    let registrations = value(&before_crs, "ims_crs_registrations_total");

    crs.register(&env, "mia", PW);
    let bad = Client::start(&env, crs.addr, "mia-bad", "wrong");
    bad.send("/login mia");
    bad.wait_error("login");
    let mia = Client::start(&env, crs.addr, "mia", PW);
    mia.send("/login mia");
    mia.wait_event("logged-in", |e| e["user"] == "mia");

    let after_crs = scrape(crs_m);
    let after_ms = scrape(ms_m);
    assert_eq!(value(&after_crs, "ims_crs_online_users"), 1.0);
    assert_eq!(value(&after_ms, "ims_ms_online_users"), 1.0);
    assert_eq!(value(&after_crs, "ims_crs_logins_total"), logins_crs + 1.0);
    assert_eq!(value(&after_ms, "ims_ms_logins_total"), logins_ms + 1.0);
    assert_eq!(
        value(&after_crs, "ims_crs_registrations_total"),
        registrations + 1.0
    );
    assert!(value(&after_ms, "ims_ms_login_failures_total") >= 1.0);
    assert!(value(&after_crs, "ims_crs_connections_accepted_total") > 0.0);
    assert!(value(&after_ms, "ims_ms_connections_held") >= 0.0);
    for name in ["ims_crs_queue_depth", "ims_crs_busy_replies_total"] {
        value(&after_crs, name);
    }
    // The store latency histogram has observations of the login's reads.
    let hist = after_crs
        .samples
        .iter()
        .find(|s| s.metric == "ims_crs_store_seconds" && s.labels.get("op") == Some("get_user"))
        .expect("a get_user latency histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.last().map(|b| b.count).unwrap_or(0.0);
            assert!(total >= 1.0, "{buckets:?}");
        }
        other => panic!("store_seconds is not a histogram: {other:?}"),
    }

    let (status, _) = get(crs_m, "/other");
    assert!(status.contains("404"), "{status}");
}
