//! A real DNS server for the tests: unbound (from apt) started inside a test's network
//! namespace, optionally forwarding a zone to a second unbound there, with its own statistics
//! read through `unbound-control`. And a plain UDP client built on hickory-proto.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RecordType},
};

use super::{Netns, unique};

/// The main server's address (port 53, the collector's default DNS port).
pub const SERVER: &str = "127.0.0.1:53";
/// The upstream's port: the main server forwards `fwd.example.` here.
pub const UPSTREAM_PORT: u16 = 5300;
/// How long the client waits for an answer (as dig does: a loaded machine may hold a
/// datagram for a while, and the client never asks again, which would change the counts).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The zones the main server answers itself. Unknown names under `test.` get NXDOMAIN;
/// `refused.test.` is refused.
const LOCAL_ZONES: &str = r#"
  local-zone: "test." static
  local-data: "www.test. 300 IN A 192.0.2.1"
  local-data: "www.test. 300 IN AAAA 2001:db8::1"
  local-data: "api.test. 300 IN A 192.0.2.2"
  local-data: "mail.test. 300 IN MX 10 mx.test."
  local-data: "txt.test. 300 IN TXT \"hello\""
  local-zone: "refused.test." refuse
"#;

/// One or two unbound processes, killed on drop.
pub struct Unbound {
    dir: PathBuf,
    main_config: PathBuf,
    children: Vec<Child>,
}

fn server_block(dir: &std::path::Path, port: u16) -> String {
    format!(
        r#"server:
  interface: 127.0.0.1@{port}
  port: {port}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{dir}"
  pidfile: ""
  use-syslog: no
  logfile: ""
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  qname-minimisation: no
  do-not-query-localhost: no
  statistics-cumulative: yes
"#,
        dir = dir.display()
    )
}

/// unbound copied into `dir`, to run from there: AppArmor profiles attach by path, and
/// Debian's for /usr/sbin/unbound (enforced where AppArmor is on) denies it the files of a
/// test's directory. The copy runs unconfined, and the host's profile stays as it is.
fn unconfined_unbound(dir: &std::path::Path) -> PathBuf {
    let copy = dir.join("unbound");
    fs::copy("/usr/sbin/unbound", &copy)
        .expect("copying /usr/sbin/unbound (apt install unbound; cargo xtask prereqs does)");
    // Run from the temporary directory: one mounted noexec refuses it.
    copy
}

impl Unbound {
    /// The main server on 127.0.0.1:53 with [`LOCAL_ZONES`]; with `forwarding`, also an
    /// upstream on port [`UPSTREAM_PORT`] that answers `fwd.example.` (a and b exist, other
    /// names are NXDOMAIN) and to which the main server forwards that zone.
    pub fn start(netns: &Netns, forwarding: bool) -> Self {
        let dir = std::env::temp_dir().join(unique("unbound"));
        fs::create_dir_all(&dir).unwrap();
        // Made at once, so that its drop removes the directory whatever fails next (unbound
        // not installed, say) and stops whichever servers started should one fail to.
        let mut server = Self {
            main_config: dir.join("main.conf"),
            dir: dir.clone(),
            children: Vec::new(),
        };
        let mut main = server_block(&dir, 53);
        main.push_str(LOCAL_ZONES);
        // A forwarded query is asked again only after 5 s without an answer (376 ms for an
        // unknown server by default, less once its answers came fast): on a loaded machine a
        // retry would add to the upstream queries counted.
        main.push_str("  unknown-server-time-limit: 5000\n  infra-cache-min-rtt: 5000\n");
        writeln!(
            main,
            "remote-control:\n  control-enable: yes\n  control-interface: {}",
            dir.join("control.sock").display()
        )
        .unwrap();
        let mut configs = Vec::new();
        if forwarding {
            writeln!(
                main,
                "forward-zone:\n  name: \"fwd.example.\"\n  forward-addr: 127.0.0.1@{UPSTREAM_PORT}"
            )
            .unwrap();
            let mut upstream = server_block(&dir, UPSTREAM_PORT);
            upstream.push_str(
                "  local-zone: \"fwd.example.\" static\n  local-data: \"a.fwd.example. 3600 IN A 192.0.2.10\"\n  local-data: \"b.fwd.example. 3600 IN A 192.0.2.11\"\n",
            );
            configs.push(("upstream.conf", upstream));
        }
        configs.push(("main.conf", main));
        let unbound = unconfined_unbound(&dir);
        for (file, text) in &configs {
            let path = dir.join(file);
            fs::write(&path, text).unwrap();
            let child = netns
                .command(unbound.to_str().unwrap())
                .arg("-d")
                .arg("-c")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting the copy of unbound (is the temporary directory noexec?)");
            server.children.push(child);
        }
        server.wait_until_answering(netns);
        server
    }

    /// Waits for the control socket, so that the probe itself sends no DNS query.
    fn wait_until_answering(&self, netns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = netns
                .command("unbound-control")
                .arg("-c")
                .arg(&self.main_config)
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "unbound did not start within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `unbound-control stats_noreset`, as name → value.
    pub fn stats(&self, netns: &Netns) -> BTreeMap<String, f64> {
        let out = netns
            .command("unbound-control")
            .arg("-c")
            .arg(&self.main_config)
            .arg("stats_noreset")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unbound-control stats_noreset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }
}

impl Unbound {
    /// The main server's process id (the first started is the upstream, if any).
    pub fn main_pid(&self) -> u32 {
        self.children.last().expect("unbound is running").id()
    }

    /// SIGSTOP or SIGCONT to the main server. Stopped, it reads nothing: the queries sent
    /// meanwhile wait in its socket. Returns once it is stopped (or no longer is).
    pub fn pause_main(&self, paused: bool) {
        pause(self.main_pid(), paused);
    }

    /// As [`Self::pause_main`], for the upstream of a forwarding setup.
    pub fn pause_upstream(&self, paused: bool) {
        assert_eq!(
            self.children.len(),
            2,
            "no upstream: started without forwarding"
        );
        pause(self.children[0].id(), paused);
    }
}

/// SIGSTOP or SIGCONT to `pid`, then waits until its state says so.
fn pause(pid: u32, paused: bool) {
    let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), signal) };
    super::wait_for(
        "unbound to stop or continue",
        Duration::from_secs(15),
        || {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The state follows the command name, which is in parentheses.
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            ((state == 'T') == paused).then_some(())
        },
    );
}

impl Drop for Unbound {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A DNS client on one UDP socket (call from inside the namespace).
pub struct Client {
    socket: UdpSocket,
    next_id: u16,
}

impl Client {
    pub fn new(server: &str) -> Self {
        let server: SocketAddr = server.parse().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        socket.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        Self { socket, next_id: 1 }
    }

    /// The client's port.
    pub fn port(&self) -> u16 {
        self.socket.local_addr().unwrap().port()
    }

    /// Sends one query and waits for its answer: exactly one query on the wire, no retries.
    pub fn query(&mut self, name: &str, qtype: RecordType) -> ResponseCode {
        let id = self.send(name, qtype);
        self.receive(id)
    }

    /// [`Self::query`] in the class `class`.
    pub fn query_in_class(
        &mut self,
        name: &str,
        qtype: RecordType,
        class: DNSClass,
    ) -> ResponseCode {
        let id = self.send_in_class(name, qtype, class);
        self.receive(id)
    }

    /// Sends one query; its id, for [`Self::receive`].
    pub fn send(&mut self, name: &str, qtype: RecordType) -> u16 {
        self.send_in_class(name, qtype, DNSClass::IN)
    }

    /// [`Self::query`] with an EDNS OPT record of `version` (a server that speaks only 0
    /// answers any other with BADVERS, RFC 6891).
    pub fn query_with_edns_version(
        &mut self,
        name: &str,
        qtype: RecordType,
        version: u8,
    ) -> ResponseCode {
        let mut edns = Edns::new();
        edns.set_version(version);
        let id = self.send_message(name, qtype, DNSClass::IN, Some(edns));
        self.receive(id)
    }

    /// [`Self::send`] in the class `class`.
    pub fn send_in_class(&mut self, name: &str, qtype: RecordType, class: DNSClass) -> u16 {
        self.send_message(name, qtype, class, None)
    }

    fn send_message(
        &mut self,
        name: &str,
        qtype: RecordType,
        class: DNSClass,
        edns: Option<Edns>,
    ) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut message = Message::new();
        message
            .set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(
                Query::query(Name::from_ascii(name).unwrap(), qtype)
                    .set_query_class(class)
                    .clone(),
            );
        *message.extensions_mut() = edns;
        self.socket.send(&message.to_vec().unwrap()).unwrap();
        id
    }

    /// Waits for the answer to the query `id` sent last.
    pub fn receive(&mut self, id: u16) -> ResponseCode {
        let mut buf = [0u8; 4096];
        let len = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|err| panic!("no answer to query {id}: {err}"));
        let response = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(response.id(), id, "answer to another query");
        response.response_code()
    }
}
