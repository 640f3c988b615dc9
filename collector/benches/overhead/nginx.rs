//! The new-connection load through a real reverse proxy: nginx (from apt) in the benchmark's
//! namespace, proxying every request to a backend over kept-alive upstream connections, as an
//! ingress proxy does. Each client connection then costs the proxy what it costs in
//! production (accept, parse, proxy, log nothing), so the ratio shows the collector's share of
//! a proxied connection rather than of a bare accept and close.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::support::{Netns, ScratchDir, wait_for};

/// The port clients connect to: the route the agent watches.
pub const PROXY_PORT: u16 = 18081;
/// The backend's port, on the same nginx: not a route, like a backend on another host.
const BACKEND_PORT: u16 = 18082;

pub const ROUTE: &str = r#"
[[routes]]
name = "nginx"
ports = [18081]
type = "http"
"#;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// One nginx process, killed on drop. `master_process off` keeps it to one process (the
/// worker), so that a kill leaves no orphaned worker behind.
pub struct Nginx {
    child: Child,
    _dir: ScratchDir,
}

impl Nginx {
    pub fn start(netns: &Netns) -> Self {
        let dir = ScratchDir::new("nginx");
        let root = dir.0.display();
        let config = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root};
  proxy_temp_path {root};
  fastcgi_temp_path {root};
  uwsgi_temp_path {root};
  scgi_temp_path {root};
  upstream backend {{
    server 127.0.0.1:{BACKEND_PORT};
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{PROXY_PORT};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
  server {{
    listen 127.0.0.1:{BACKEND_PORT};
    location / {{ return 200 "ok\n"; }}
  }}
}}
"#
        );
        let path = dir.path("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let child = netns
            .command("nginx")
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting nginx (apt install nginx-light; cargo xtask prereqs does)");
        let nginx = Self { child, _dir: dir };
        wait_for("nginx to answer", Duration::from_secs(10), || {
            netns.run(|| request().ok())
        });
        nginx
    }

    /// Its process id (`nsenter` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One proxied request on a new connection; its status line must say 200.
fn request() -> std::io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", PROXY_PORT))?;
    stream.write_all(REQUEST)?;
    let mut response = Vec::with_capacity(256);
    stream.read_to_end(&mut response)?;
    if response.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "nginx answered {:?}",
            String::from_utf8_lossy(&response)
        )))
    }
}

/// Requests made by one client, each on a new connection that nginx closes, and how many
/// per second. The client runs on the load's CPU, as nginx does.
pub fn connection_rate(netns: &Netns, seconds: f64) -> (u64, f64) {
    netns.run(move || {
        crate::pin_to_load_cpu();
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(seconds);
        let mut done = 0u64;
        while Instant::now() < deadline {
            request().unwrap();
            done += 1;
        }
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let rate = done as f64 / started.elapsed().as_secs_f64();
        (done, rate)
    })
}
