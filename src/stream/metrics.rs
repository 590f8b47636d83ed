//! Prometheus metrics of a running pipeline, served as text by `ferry run --metrics ADDR`.

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// The process's metrics. Operators record their latency here whether or not they are served.
pub struct Metrics {
    registry: Registry,
    pub records_in: Counter,
    pub records_out: Counter,
    pub batches: Counter,
    pub commits: Counter,
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

/// Serves the metrics on `addr` (any path answers) until the process ends.
pub async fn serve(addr: &str) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                // Read the request head (a scrape is a small GET); the path does not matter.
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 65536 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let body = metrics().render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(local)
}
