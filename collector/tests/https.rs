//! The endpoint as operators expose it beyond loopback: HTTPS with a test certificate,
//! basic-auth users from a file made by `htpasswd -B`, the counts unchanged behind them, and
//! bad certificate or user files refused at start with the reason.

mod support;

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use support::{
    Agent, AgentConfig, COLLECTOR, LISTEN, Netns, Reaped, ScratchDir, refused_start, sample,
    stdout_of, wait_for,
};

const PORT: u16 = 18443;
const USER: &str = "prometheus";
const PASSWORD: &str = "scrape-Pa55";

/// A self-signed certificate for 127.0.0.1 and its key: `(cert, key)` in `dir`.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    certificate(dir, name, "IP:127.0.0.1")
}

/// A self-signed certificate for `alt_names` (as openssl's subjectAltName takes them) and
/// its key: `(cert, key)` in `dir`.
fn certificate(dir: &Path, name: &str, alt_names: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    stdout_of(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", &format!("/CN={name}")])
            .args(["-addext", &format!("subjectAltName={alt_names}")])
            // A server certificate, as a CA would issue one (rustls refuses a CA certificate
            // as the end entity).
            .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (cert, key)
}

/// A CA, and a server certificate for 127.0.0.1 it issued, written into `dir` as
/// cert-manager's CA issuer writes a `kubernetes.io/tls` Secret: `ca.crt`, `tls.crt`,
/// `tls.key`. Returns the CA's certificate.
fn ca_issued(dir: &Path) -> PathBuf {
    let (ca, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    stdout_of(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=collector test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE", "-keyout"])
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca),
    );
    let (csr, extensions) = (dir.join("tls.csr"), dir.join("tls.ext"));
    stdout_of(
        Command::new("openssl")
            .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-subj", "/CN=collector", "-keyout"])
            .arg(dir.join("tls.key"))
            .arg("-out")
            .arg(&csr),
    );
    fs::write(
        &extensions,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    stdout_of(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-in"])
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-CAcreateserial", "-extfile"])
            .arg(&extensions)
            .arg("-out")
            .arg(dir.join("tls.crt")),
    );
    for made in [ca_key, csr, extensions, dir.join("ca.srl")] {
        let _ = fs::remove_file(made);
    }
    ca
}

/// `curl` inside `netns` against the agent over HTTPS, trusting `ca`. Returns the status
/// (0 when no HTTP exchange happened, e.g. a failed handshake) and headers plus body.
fn curl(netns: &Netns, ca: &Path, path: &str, user: Option<&str>) -> (u16, String) {
    let mut command = netns.command("curl");
    command
        .args(["-sS", "-i", "--max-time", "30", "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}"]);
    if let Some(user) = user {
        command.args(["-u", user]);
    }
    let out = command
        .arg(format!("https://{LISTEN}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (response, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), response.to_owned())
}

/// A users file with [`USER`] and [`PASSWORD`], in `scratch`.
fn users_file(scratch: &ScratchDir) -> PathBuf {
    let users = scratch.path("users");
    // The tool operators are told to use; -C 4 keeps the test quick.
    stdout_of(
        Command::new("htpasswd")
            .args(["-B", "-C", "4", "-b", "-c"])
            .arg(&users)
            .args([USER, PASSWORD]),
    );
    users
}

/// When `cert` expires (its notAfter), in seconds since the epoch.
#[expect(
    clippy::cast_precision_loss,
    reason = "a date in seconds, exact in f64"
)]
fn not_after(cert: &Path) -> f64 {
    let end = stdout_of(
        Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(cert),
    );
    let date = end.trim().strip_prefix("notAfter=").unwrap().to_owned();
    let seconds = stdout_of(Command::new("date").args(["-u", "-d", &date, "+%s"]));
    seconds.trim().parse::<u64>().unwrap() as f64
}

fn authorized() -> String {
    format!("{USER}:{PASSWORD}")
}

#[test]
fn https_and_basic_auth_guard_exact_counts() {
    const CONNECTIONS: u32 = 7;
    const REQUEST: u32 = 100;
    let netns = Netns::new();
    let scratch = ScratchDir::new("https");
    let (cert, key) = self_signed(&scratch.0, "first");
    let users = users_file(&scratch);
    let token = scratch.path("token");
    fs::write(&token, "cli-token\n").unwrap();
    let (served_cert, served_key) = served_copy(&scratch, &cert, &key);
    let config = AgentConfig::new(&format!(
        "[[routes]]\nname = \"secure\"\nports = [{PORT}]\ntype = \"tcp\"\n\n[http]\nbasic_auth_users_file = \"{}\"\nbearer_token_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        users.display(),
        token.display(),
        served_cert.display(),
        served_key.display()
    ));
    let agent = ready_tls_agent(&netns, &config, &cert);

    let listener = netns.run(|| TcpListener::bind(("127.0.0.1", PORT)).unwrap());
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; REQUEST as usize];
            stream.read_exact(&mut request).unwrap();
        }
    });
    netns.run(|| {
        for _ in 0..CONNECTIONS {
            let mut stream = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
            stream.write_all(&[b'x'; REQUEST as usize]).unwrap();
        }
    });
    server.join().unwrap();

    let route = [("route", "secure")];
    let metrics = wait_for("the connections to close", Duration::from_secs(10), || {
        let (status, metrics) = curl(&netns, &cert, "/metrics", Some(&authorized()));
        assert_eq!(status, 200, "{metrics}");
        (sample(&metrics, "collector_proxy_connections_closed_total", &route)
            == Some(f64::from(CONNECTIONS)))
        .then_some(metrics)
    });
    assert_eq!(
        sample(&metrics, "collector_proxy_connections_opened_total", &route),
        Some(f64::from(CONNECTIONS))
    );
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_connection_received_bytes_total",
            &route
        ),
        Some(f64::from(CONNECTIONS * REQUEST))
    );

    cli_reads_the_secured_agent(&netns, &config, CONNECTIONS);

    // Without credentials, with a wrong password or an unknown user: 401 with the challenge.
    for user in [None, Some("prometheus:wrong"), Some("nobody:scrape-Pa55")] {
        for path in ["/metrics", "/api/v1/proxy", "/api/v1/dns", "/api/v1/events"] {
            let (status, response) = curl(&netns, &cert, path, user);
            assert_eq!(status, 401, "{path} as {user:?}: {response}");
            assert!(
                response.contains("www-authenticate: Basic realm=\"collector\", Bearer"),
                "{response}"
            );
        }
    }
    // The probes answer kubelet, which carries no credentials.
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(curl(&netns, &cert, probe, None).0, 200, "{probe}");
    }
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = netns
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{LISTEN}/healthz"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "000");

    rotate_in_place(&netns, &scratch, &cert, (&served_cert, &served_key));
    let (status, metrics) = curl(&netns, &served_cert, "/metrics", Some(&authorized()));
    assert_eq!(status, 200);
    assert_eq!(
        sample(&metrics, "collector_proxy_connections_opened_total", &route),
        Some(f64::from(CONNECTIONS))
    );
    assert!(agent.stop().success());
}

#[test]
fn the_cli_checks_a_certificate_that_names_no_address_against_server_name() {
    // As cert-manager issues one for a DaemonSet: a service's name, no node's address.
    let netns = Netns::new();
    let scratch = ScratchDir::new("https-name");
    let (cert, key) = certificate(&scratch.0, "named", "DNS:collector.ingress.svc");
    let config = AgentConfig::new(&format!(
        "[[routes]]\nname = \"secure\"\nports = [{PORT}]\ntype = \"tcp\"\n\n[http]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let stats = |extra: &[&str]| {
        netns
            .command(COLLECTOR)
            .args(["stats", "proxy", "--json", "--config"])
            .arg(&config.path)
            .args(extra)
            .output()
            .unwrap()
    };
    let by_name = ["--server-name", "collector.ingress.svc"];
    let agent = Agent::spawn_until(&netns, netns.command(COLLECTOR), &config, &[], || {
        stats(&by_name).status.success()
    });
    let figures: serde_json::Value = serde_json::from_slice(&stats(&by_name).stdout).unwrap();
    assert_eq!(figures["totalConnections"], 0);
    let by_address = stats(&[]);
    let stderr = String::from_utf8_lossy(&by_address.stderr);
    assert!(
        !by_address.status.success() && stderr.contains("certificate"),
        "{stderr}"
    );
    assert!(agent.stop().success());
}

#[test]
fn the_cli_trusts_the_ca_beside_the_certificate_and_names_the_fix_when_refused() {
    let netns = Netns::new();
    let scratch = ScratchDir::new("https-ca");
    // The Secret's volume, as the DaemonSet mounts it.
    let secret = scratch.path("tls");
    fs::create_dir(&secret).unwrap();
    let ca = ca_issued(&secret);
    let token = scratch.path("token");
    fs::write(&token, "cli-token\n").unwrap();
    let (served_cert, served_key) = (secret.join("tls.crt"), secret.join("tls.key"));
    let config = AgentConfig::new(&format!(
        "[http]\nbearer_token_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        token.display(),
        served_cert.display(),
        served_key.display()
    ));
    let agent = ready_tls_agent(&netns, &config, &ca);
    let stats = |args: &[&str]| {
        let out = netns
            .command(COLLECTOR)
            .args(["stats", "proxy", "--json"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    };
    let config_path = config.path.to_str().unwrap();
    let ca_path = ca.to_str().unwrap();

    // The agent's config: its certificate, the CA beside it, its token.
    let (ok, stderr) = stats(&["--config", config_path]);
    assert!(ok, "{stderr}");
    // Plain HTTP to the HTTPS agent.
    let (ok, stderr) = stats(&["--listen", LISTEN]);
    assert!(
        !ok && stderr.contains("the agent serves HTTPS") && stderr.contains("--config"),
        "{stderr}"
    );
    // HTTPS, without the token.
    let (ok, stderr) = stats(&["--listen", LISTEN, "--cacert", ca_path]);
    assert!(
        !ok && stderr.contains("401") && stderr.contains("pass --config FILE"),
        "{stderr}"
    );
    // The CA not beside the certificate (an issuer whose Secrets carry none).
    let elsewhere = scratch.path("ca.crt");
    fs::rename(&ca, &elsewhere).unwrap();
    let (ok, stderr) = stats(&["--config", config_path]);
    assert!(
        !ok && stderr.contains("pass --cacert CA.pem") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    let (ok, stderr) = stats(&[
        "--config",
        config_path,
        "--cacert",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");

    // A self-signed certificate as `openssl req -x509` makes it by default: CA:TRUE, which
    // curl (OpenSSL) takes and rustls refuses as a server's.
    let (ca_cert, ca_key) = (scratch.path("self.crt"), scratch.path("self.key"));
    stdout_of(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=self",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .args(["-addext", "basicConstraints=critical,CA:TRUE", "-keyout"])
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_cert),
    );
    fs::rename(&ca_key, &served_key).unwrap();
    fs::rename(&ca_cert, &served_cert).unwrap();
    wait_for(
        "the self-signed certificate",
        Duration::from_secs(10),
        || (curl(&netns, &served_cert, "/healthz", None).0 == 200).then_some(()),
    );
    let (ok, stderr) = stats(&["--config", config_path]);
    assert!(
        !ok && stderr.contains("CA:TRUE") && stderr.contains("--cacert CA.pem"),
        "{stderr}"
    );
    assert!(agent.stop().success());
}

/// The CLI finds address, HTTPS and token in the agent's config; without it, it fails.
fn cli_reads_the_secured_agent(netns: &Netns, config: &AgentConfig, connections: u32) {
    let printed = stdout_of(
        netns
            .command(COLLECTOR)
            .args(["stats", "proxy", "--json", "--config"])
            .arg(&config.path),
    );
    let figures: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(figures["totalConnections"], connections);
    let plain = netns
        .command(COLLECTOR)
        .args(["stats", "proxy", "--json"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain HTTP to the HTTPS port");
}

/// Replaces the served pair as cert-manager does (new files renamed over the old), within
/// the same tick of the clock (same modification times): the next handshake presents the
/// new certificate, and the old one is trusted no more.
fn rotate_in_place(netns: &Netns, scratch: &ScratchDir, old_cert: &Path, served: (&Path, &Path)) {
    let (new_cert, new_key) = self_signed(&scratch.0, "second");
    assert_eq!(curl(netns, &new_cert, "/healthz", None).0, 0);
    for (new, old) in [(&new_cert, served.0), (&new_key, served.1)] {
        let modified = fs::metadata(old).unwrap().modified().unwrap();
        fs::File::options()
            .write(true)
            .open(new)
            .unwrap()
            .set_modified(modified)
            .unwrap();
    }
    fs::rename(&new_key, served.1).unwrap();
    fs::rename(&new_cert, served.0).unwrap();
    wait_for("the rotated certificate", Duration::from_secs(10), || {
        (curl(netns, served.0, "/healthz", None).0 == 200).then_some(())
    });
    assert_eq!(curl(netns, old_cert, "/healthz", None).0, 0);
}

/// `collector run` inside `netns` with `http` as the config's `[http]` table: fails, and
/// returns what it said.
fn refused(netns: &Netns, http: &str) -> String {
    let config = AgentConfig::new(&format!(
        "[[routes]]\nname = \"web\"\nports = [{PORT}]\ntype = \"http\"\n\n[http]\n{http}"
    ));
    support::refused_start(netns, &config.path)
}

#[test]
fn bad_certificate_or_user_files_stop_the_start_with_the_reason() {
    let netns = Netns::new();
    let scratch = ScratchDir::new("https-bad");
    let (cert, _) = self_signed(&scratch.0, "one");
    let (_, other_key) = self_signed(&scratch.0, "two");

    let stderr = refused(&netns, &format!("tls_cert_file = \"{}\"\n", cert.display()));
    assert!(
        stderr.contains("collector.toml:11:") && stderr.contains("needs tls_key_file"),
        "{stderr}"
    );

    let stderr = refused(
        &netns,
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            cert.display(),
            other_key.display()
        ),
    );
    assert!(stderr.contains("does not fit the certificate"), "{stderr}");

    let users = scratch.path("users");
    fs::write(&users, "# scrapers\nprometheus:$apr1$abc$def\n").unwrap();
    let stderr = refused(
        &netns,
        &format!("basic_auth_users_file = \"{}\"\n", users.display()),
    );
    assert!(
        stderr.contains("line 2") && stderr.contains("not bcrypt"),
        "{stderr}"
    );

    // A cap on connections that requests and event streams could fill, the probes left none
    // (a start let through is killed after 20 s).
    let config = AgentConfig::new("[http]\nmax_connections = 8\n");
    let stderr = refused_start(&netns, &config.path);
    assert!(
        stderr.contains(
            "collector.toml:6:19: max_connections = 8 must be more than \
             max_concurrent_requests + max_event_streams (64 + 8 = 72)"
        ),
        "{stderr}"
    );
}

/// An agent in `netns` serving HTTPS with a self-signed certificate named `name` (made in a
/// scratch directory `scratch`), its `[http]` table extended by `http`, once it is ready:
/// the scratch directory, the certificate, the config and the agent (held to the test's end:
/// their drops remove the files and whatever the agent left).
fn tls_agent(
    netns: &Netns,
    scratch: &str,
    name: &str,
    http: &str,
) -> (ScratchDir, PathBuf, AgentConfig, Agent) {
    let scratch = ScratchDir::new(scratch);
    let (cert, key) = self_signed(&scratch.0, name);
    let config = AgentConfig::new(&format!(
        "[http]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{http}",
        cert.display(),
        key.display()
    ));
    let agent = ready_tls_agent(netns, &config, &cert);
    (scratch, cert, config, agent)
}

/// The agent in `netns` with `config`, once `/readyz` answers over HTTPS trusting `ca`.
fn ready_tls_agent(netns: &Netns, config: &AgentConfig, ca: &Path) -> Agent {
    Agent::spawn_until(netns, netns.command(COLLECTOR), config, &[], || {
        curl(netns, ca, "/readyz", None).0 == 200
    })
}

/// `cert` and `key` copied to `tls.crt` and `tls.key` in `scratch`: the files the agent
/// serves, which a rotation replaces.
fn served_copy(scratch: &ScratchDir, cert: &Path, key: &Path) -> (PathBuf, PathBuf) {
    let served = (scratch.path("tls.crt"), scratch.path("tls.key"));
    fs::copy(cert, &served.0).unwrap();
    fs::copy(key, &served.1).unwrap();
    served
}

#[test]
fn silent_connections_from_one_address_leave_everyone_else_served() {
    const SILENT: usize = 100;
    // The agent's default cap per address (`[http] max_connections_per_address`).
    const PER_ADDRESS: usize = 80;
    let netns = Netns::new();
    let (_scratch, cert, _config, agent) =
        tls_agent(&netns, "silent", "silent", PATIENT_HANDSHAKES);
    // One client (another pod, say) opens connections and never starts a handshake.
    let silent: Vec<TcpStream> = (0..SILENT)
        .map(|_| held(&netns, netns.run(|| silent_from("127.0.0.2"))))
        .collect();
    // Everyone else is served meanwhile: the kubelet's probe, a scrape.
    assert_eq!(curl(&netns, &cert, "/healthz", None).0, 200);
    assert_eq!(curl(&netns, &cert, "/metrics", None).0, 200);
    // Each one beyond its share closed its oldest at once; the rest wait for their handshake.
    let (oldest, newest) = silent.split_at(SILENT - PER_ADDRESS);
    wait_for(
        "its oldest connections to be closed",
        Duration::from_secs(5),
        || oldest.iter().all(closed).then_some(()),
    );
    assert_eq!(
        newest.iter().filter(|s| closed(s)).count(),
        0,
        "connections within the address's share were closed"
    );
    drop(silent);
    assert!(agent.stop().success());
}

#[test]
fn a_silent_connection_is_closed_at_the_handshake_time_limit() {
    let netns = Netns::new();
    let (_scratch, cert, _config, agent) = tls_agent(
        &netns,
        "handshake-limit",
        "silent",
        "tls_handshake_timeout_ms = 1000\n",
    );
    let opened = std::time::Instant::now();
    let silent = held(&netns, netns.run(|| silent_from("127.0.0.2")));
    // Well before the default limit of 10 s, and not before this one.
    wait_for(
        "the silent connection to be closed",
        Duration::from_secs(6),
        || closed(&silent).then_some(()),
    );
    let lasted = opened.elapsed();
    assert!(lasted >= Duration::from_secs(1), "closed after {lasted:?}");
    // A client that does its handshake is served as before.
    assert_eq!(curl(&netns, &cert, "/healthz", None).0, 200);
    assert!(agent.stop().success());
}

#[test]
fn silent_connections_from_the_probes_own_address_give_way_to_them() {
    // The agent's default cap per address (`[http] max_connections_per_address`).
    const PER_ADDRESS: usize = 80;
    let netns = Netns::new();
    let (_scratch, cert, _config, agent) =
        tls_agent(&netns, "silent-node", "silent", PATIENT_HANDSHAKES);
    // With hostNetwork the kubelet's probes come from the node's address, as does everything
    // any other process on the node opens: here 127.0.0.1, curl's address too. Its whole share
    // taken by connections that never start a handshake, opened one at a time in this order.
    let silent: Vec<TcpStream> = (0..PER_ADDRESS)
        .map(|_| held(&netns, netns.run(|| silent_from("127.0.0.1"))))
        .collect();
    thread::sleep(Duration::from_millis(100));
    assert!(!silent.iter().any(closed), "closed below the cap");
    // The probe takes the place of the oldest of them.
    assert_eq!(curl(&netns, &cert, "/healthz", None).0, 200);
    wait_for(
        "the oldest silent connection to close",
        Duration::from_secs(5),
        || closed(&silent[0]).then_some(()),
    );
    // Once more, at the cap again: the next oldest goes.
    let refill = held(&netns, netns.run(|| silent_from("127.0.0.1")));
    assert_eq!(curl(&netns, &cert, "/readyz", None).0, 200);
    wait_for(
        "the next oldest silent connection to close",
        Duration::from_secs(5),
        || closed(&silent[1]).then_some(()),
    );
    // The others are left alone.
    assert!(
        !silent[2..].iter().chain([&refill]).any(closed),
        "connections wrongly closed"
    );
    drop((silent, refill));
    assert!(agent.stop().success());
}

/// A connection from `own` (an address of loopback's 127/8) to the agent that sends nothing,
/// non-blocking so that [`closed`] can look at it.
fn silent_from(own: &str) -> TcpStream {
    let server: std::net::SocketAddr = LISTEN.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let own: std::net::SocketAddr = format!("{own}:0").parse().unwrap();
    socket.bind(&own.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream = TcpStream::from(socket);
    stream.set_nonblocking(true).unwrap();
    stream
}

/// `[http]` lines that give TLS handshakes ten minutes: the silent connections of a test are
/// then closed only for another connection's sake, never by the handshake's time limit.
const PATIENT_HANDSHAKES: &str = "tls_handshake_timeout_ms = 600000\n";

/// `stream`, once the agent has accepted it (`ss` names the process holding its end): the
/// agent then has the connections in the order they were opened.
fn held(netns: &Netns, stream: TcpStream) -> TcpStream {
    let client = stream.local_addr().unwrap();
    wait_for(
        "the agent to accept a connection",
        Duration::from_secs(10),
        || {
            support::agents_end(netns, client)
                .contains("users:")
                .then_some(())
        },
    );
    stream
}

/// Whether the agent closed `stream` (it sends nothing on a silent connection).
fn closed(mut stream: &TcpStream) -> bool {
    match stream.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

#[test]
fn silent_connections_filling_every_place_give_way_to_the_probes() {
    // Small caps, so that a few connections fill them, and limits on requests and streams
    // small enough for them (the cap in all must be above their sum).
    const TOTAL: usize = 8;
    const PER_ADDRESS: usize = 3;
    const REQUESTS: usize = 4;
    const STREAMS: usize = 1;
    let netns = Netns::new();
    let (scratch, cert, _config, agent) = tls_agent(
        &netns,
        "idle-cap",
        "idle",
        &format!(
            "max_connections = {TOTAL}\nmax_connections_per_address = {PER_ADDRESS}\nmax_concurrent_requests = {REQUESTS}\nmax_event_streams = {STREAMS}\n{PATIENT_HANDSHAKES}"
        ),
    );
    // An event stream: in a request all along, so never taken for an idle connection.
    let stream_head = scratch.path("stream-head");
    let mut stream = Reaped::spawn(
        netns
            .command("curl")
            .args(["-sS", "-N", "-o", "/dev/null", "--cacert"])
            .arg(&cert)
            // The head as it comes (with -i, curl holds it back until the body begins).
            .arg("-D")
            .arg(&stream_head)
            .arg(format!("https://{LISTEN}/api/v1/events")),
    );
    wait_for("the event stream's answer", Duration::from_secs(10), || {
        fs::read_to_string(&stream_head)
            .is_ok_and(|text| text.starts_with("HTTP/1.1 200"))
            .then_some(())
    });

    // Someone else's connection in its TLS handshake (a scrape's, say), from an address of
    // its own: of all the silent connections, the one that has waited longest.
    let bystander = held(&netns, netns.run(|| silent_from("127.0.0.3")));
    // Every other place taken by connections that never start a handshake, from several
    // addresses, each at its own cap or below.
    let addresses = ["127.0.0.2", "127.0.0.2", "127.0.0.2"].into_iter().chain([
        "127.0.0.4",
        "127.0.0.4",
        "127.0.0.5",
    ]);
    let silent: Vec<TcpStream> = addresses
        // One at a time, so that the agent has them in this order.
        .map(|own| held(&netns, netns.run(move || silent_from(own))))
        .collect();
    assert_eq!(silent.len() + 2, TOTAL);
    // One more from an address at its cap takes the place of that address's oldest.
    let over = netns.run(|| silent_from("127.0.0.2"));
    wait_for(
        "the oldest connection of the full address to close",
        Duration::from_secs(5),
        || closed(&silent[0]).then_some(()),
    );

    // The kubelet's probe gets the place of the oldest connection of the address holding
    // the most (127.0.0.2, three), not the bystander's older one.
    assert_eq!(curl(&netns, &cert, "/healthz", None).0, 200);
    wait_for(
        "the oldest connection of the address holding the most to close",
        Duration::from_secs(5),
        || closed(&silent[1]).then_some(()),
    );
    // Once more, at the cap again, with three addresses holding two each: the oldest of
    // their connections goes.
    let refill = held(&netns, netns.run(|| silent_from("127.0.0.5")));
    assert_eq!(curl(&netns, &cert, "/readyz", None).0, 200);
    wait_for(
        "the oldest connection of the addresses holding the most to close",
        Duration::from_secs(5),
        || closed(&silent[2]).then_some(()),
    );
    // The rest, the bystander first, are left alone, and the stream goes on.
    assert!(!closed(&bystander), "the bystander's connection was closed");
    let open = silent[3..]
        .iter()
        .chain([&over, &refill])
        .filter(|s| !closed(s))
        .count();
    assert_eq!(open, silent.len() - 1, "connections wrongly closed");
    assert!(stream.try_wait().is_none(), "the event stream was closed");
    drop(stream);
    drop((bystander, silent, over, refill));
    assert!(agent.stop().success());
}

/// A scraper that keeps its connection open (Prometheus does) makes no handshake, at which
/// the certificate's files were read again: a renewal that cannot be loaded showed only once
/// some other client connected, which on a host scraped every 15 s could be weeks. Each
/// scrape looks at them too.
#[test]
fn a_kept_alive_scrape_sees_a_renewal_that_cannot_be_loaded() {
    let netns = Netns::new();
    let scratch = ScratchDir::new("kept-alive");
    let (cert, key) = self_signed(&scratch.0, "first");
    let (served_cert, served_key) = served_copy(&scratch, &cert, &key);
    let config = AgentConfig::new(&format!(
        "[http]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        served_cert.display(),
        served_key.display()
    ));
    let agent = ready_tls_agent(&netns, &config, &cert);
    // One TLS connection for every scrape.
    let mut client = support::Reaped::spawn(
        netns
            .command("openssl")
            .args(["s_client", "-quiet", "-connect", LISTEN, "-CAfile"])
            .arg(&cert)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let mut requests = client.stdin().unwrap();
    let mut answers = std::io::BufReader::new(client.stdout().unwrap());
    let mut tls_reload = || {
        write!(
            requests,
            "GET /metrics HTTP/1.1\r\nHost: c\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        .unwrap();
        let mut metrics = String::new();
        while !metrics.ends_with("# EOF\n") {
            assert_ne!(
                std::io::BufRead::read_line(&mut answers, &mut metrics).unwrap(),
                0,
                "{metrics}"
            );
        }
        sample(
            &metrics,
            "collector_http_secret_last_reload_successful",
            &[("secret", "tls")],
        )
    };
    assert_eq!(tls_reload(), Some(1.0));
    fs::write(&served_cert, "not a certificate\n").unwrap();
    assert_eq!(tls_reload(), Some(0.0));
    fs::copy(&cert, &served_cert).unwrap();
    assert_eq!(tls_reload(), Some(1.0));
    assert!(agent.stop().success());
}

/// A secret file that fails to load again keeps the previous secret in use, and `/metrics`
/// says so, beside when the certificate served expires: a renewal that cannot be loaded was
/// found only when the old certificate expired and every scrape failed.
#[test]
fn a_failed_reload_keeps_the_previous_secret_and_the_metrics_say_so() {
    let netns = Netns::new();
    let scratch = ScratchDir::new("reloads");
    let (cert, key) = self_signed(&scratch.0, "first");
    let users = users_file(&scratch);
    let (served_cert, served_key) = served_copy(&scratch, &cert, &key);
    let config = AgentConfig::new(&format!(
        "[[routes]]\nname = \"web\"\nports = [{PORT}]\ntype = \"tcp\"\n\n[http]\nbasic_auth_users_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        users.display(),
        served_cert.display(),
        served_key.display()
    ));
    let agent = ready_tls_agent(&netns, &config, &cert);
    // The last reloads of the certificate and the users, and when the certificate served
    // expires, as a scrape trusting `ca` with the user's password reads them.
    let figures = |ca: &Path| {
        let (status, metrics) = curl(&netns, ca, "/metrics", Some(&authorized()));
        assert_eq!(status, 200, "{metrics}");
        let reload = |secret: &str| {
            sample(
                &metrics,
                "collector_http_secret_last_reload_successful",
                &[("secret", secret)],
            )
        };
        (
            reload("tls"),
            reload("basic_auth_users"),
            sample(
                &metrics,
                "collector_http_tls_certificate_expiration_timestamp_seconds",
                &[],
            ),
        )
    };
    let first_expires = not_after(&cert);
    assert_eq!(figures(&cert), (Some(1.0), Some(1.0), Some(first_expires)));

    // A renewal that is no certificate, and a line without a hash added to the users: this
    // scrape's handshake and its password read them again, and keep the previous ones.
    fs::write(&served_cert, "not a certificate\n").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&users)
        .unwrap()
        .write_all(b"no-hash-here\n")
        .unwrap();
    assert_eq!(figures(&cert), (Some(0.0), Some(0.0), Some(first_expires)));

    // Good ones again.
    rotate_in_place(&netns, &scratch, &cert, (&served_cert, &served_key));
    users_file(&scratch);
    let second_expires = not_after(&served_cert);
    assert_eq!(
        figures(&served_cert),
        (Some(1.0), Some(1.0), Some(second_expires))
    );

    // A file gone fails the same way, and is read again once it is back.
    let key = fs::read(&served_key).unwrap();
    fs::remove_file(&served_key).unwrap();
    assert_eq!(
        figures(&served_cert),
        (Some(0.0), Some(1.0), Some(second_expires))
    );
    fs::write(&served_key, key).unwrap();
    assert_eq!(
        figures(&served_cert),
        (Some(1.0), Some(1.0), Some(second_expires))
    );
    assert!(agent.stop().success());
}
