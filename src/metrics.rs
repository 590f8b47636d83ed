//! Prometheus metrics of a running pipeline, served as text by `ferry run --metrics ADDR`
//! (hyper's HTTP/1 server: `GET /metrics` only, on loopback unless an address says otherwise).

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The process's metrics. Operators record their latency here whether or not they are served.
pub struct Metrics {
    registry: Registry,
    pub records_in: Counter,
    pub records_out: Counter,
    pub batches: Counter,
    pub commits: Counter,
    /// Commits that failed mid-stream (their offsets go with the next one).
    pub commit_failures: Counter,
    /// Bad records by kind (`decode`, `operator`) and what happened to them.
    pub errors: Family<Labels, Counter>,
    pub dead_letters: Counter,
    /// Sum of the consumer lag over assigned partitions (from librdkafka statistics).
    pub consumer_lag: Gauge,
    pub batch_seconds: Histogram,
    pub operator_seconds: HistogramFamily,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let m = Metrics {
            registry: Registry::default(),
            records_in: Counter::default(),
            records_out: Counter::default(),
            batches: Counter::default(),
            commits: Counter::default(),
            commit_failures: Counter::default(),
            errors: Family::default(),
            dead_letters: Counter::default(),
            consumer_lag: Gauge::default(),
            batch_seconds: latency_histogram(),
            operator_seconds: HistogramFamily::new_with_constructor(latency_histogram),
        };
        registry.register(
            "records_in",
            "Records consumed from the source",
            m.records_in.clone(),
        );
        registry.register(
            "records_out",
            "Rows written to the sink",
            m.records_out.clone(),
        );
        registry.register("batches", "Micro-batches processed", m.batches.clone());
        registry.register(
            "commits",
            "Source offset commits (or committed transactions)",
            m.commits.clone(),
        );
        registry.register(
            "commit_failures",
            "Offset commits that failed mid-stream; their offsets go with the next commit",
            m.commit_failures.clone(),
        );
        registry.register(
            "errors",
            "Records that could not be processed, by kind",
            m.errors.clone(),
        );
        registry.register(
            "dead_letters",
            "Records sent to the dead-letter sink",
            m.dead_letters.clone(),
        );
        registry.register(
            "consumer_lag",
            "Records behind the end of the assigned partitions",
            m.consumer_lag.clone(),
        );
        registry.register(
            "batch_seconds",
            "Time to process one micro-batch, source to durable sink",
            m.batch_seconds.clone(),
        );
        registry.register(
            "operator_seconds",
            "Time of one operator call over a batch",
            m.operator_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a bad record of `kind` (`decode`, `operator`).
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }

    /// Records one operator call's latency.
    pub fn operator_latency(&self, operator: &str, seconds: f64) {
        self.operator_seconds
            .get_or_create(&vec![("operator".to_string(), operator.to_string())])
            .observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// How long a scraper has to send its request head, and to finish its exchange.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where `--metrics ADDR` listens: `HOST:PORT` as given, a bare `PORT` on loopback.
pub fn listen_addr(addr: &str) -> String {
    if addr.parse::<u16>().is_ok() {
        format!("127.0.0.1:{addr}")
    } else {
        addr.to_string()
    }
}

type Body = http_body_util::Full<hyper::body::Bytes>;

/// `GET /metrics`: the exposition; any other path 404, any other method 405.
async fn answer(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::convert::Infallible> {
    use hyper::{Method, StatusCode, header};
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, metrics().render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_string(),
        ),
    };
    let mut response = hyper::Response::new(Body::from(body));
    *response.status_mut() = status;
    let content_type = if status == StatusCode::OK {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
    }
    Ok(response)
}

/// Serves the metrics on `addr` ([`listen_addr`]) until the process ends.
pub async fn serve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind(listen_addr(addr)).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(socket), hyper::service::service_fn(answer));
                let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, connection).await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    /// One exchange: the raw response.
    fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_get_metrics_only_on_loopback_with_timeouts() {
        let addr = super::serve("0").await.unwrap();
        assert!(
            addr.ip().is_loopback(),
            "a bare port binds loopback: {addr}"
        );
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (ok, missing, post, silent) = tokio::task::spawn_blocking(move || {
            let ok = exchange(addr, &get("/metrics"));
            let missing = exchange(addr, &get("/"));
            let post = exchange(
                addr,
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            );
            // A client that never finishes its request head is cut off.
            let started = std::time::Instant::now();
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            // A server that never cuts it off fails the test (by the timeout) instead of hanging.
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            (ok, missing, post, started.elapsed())
        })
        .await
        .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("ferry_records_in_total"), "{ok}");
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            silent < super::HEAD_TIMEOUT + std::time::Duration::from_secs(5),
            "{silent:?}"
        );
        assert_eq!(super::listen_addr("0.0.0.0:9464"), "0.0.0.0:9464");
    }
}
