//! deploy/container/Containerfile, checked by building it with podman and running the image:
//! its root filesystem becomes the agent's root (chroot, private mounts, the test's network
//! namespace), as a container runtime would set it up, and the agent counts known traffic
//! with the image's own nft.
//!
//! CI has no registry but the package mirrors, so the Debian base is made here with
//! debootstrap (once per machine) and handed to the Containerfile's `BASE` argument.
//! `podman run` itself cannot be used on these machines: crun refuses the hybrid cgroup
//! layout.

mod support;

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use support::{
    Agent, AgentConfig, COLLECTOR, Netns, assert_no_pins, of_a_killed_run, sample, wait_for_closed,
};

const BASE: &str = "localhost/collector-test-base:bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const PORT: u16 = 18081;
/// The test's image, its process id after the colon.
const IMAGE_PREFIX: &str = "localhost/collector-test:";
/// The test's temporary directories, its process id after the prefix.
const TEMP_PREFIXES: [&str; 2] = ["collector-base-", "collector-image-"];
/// The directory of the host's bpffs the container gets as its /sys/fs/bpf, as the
/// manifests mount /sys/fs/bpf/collectors; its process id after the prefix.
const BPFFS_DIR_PREFIX: &str = "collectors-test-";

fn run_ok(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?}: {err} (cargo xtask prereqs installs it)"));
    assert!(
        out.status.success(),
        "{command:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes what a killed run of this test left (its drop guards did not run): its
/// containers (unmounted), its image and its temporary directories.
fn sweep_killed_runs() {
    let containers =
        run_ok(Command::new("podman").args(["ps", "--all", "--format", "{{.ID}} {{.Image}}"]));
    for line in containers.lines() {
        let Some((container, image)) = line.split_once(' ') else {
            continue;
        };
        if of_a_killed_run(image, &[IMAGE_PREFIX]) {
            remove_container(container);
        }
    }
    let images =
        run_ok(Command::new("podman").args(["images", "--format", "{{.Repository}}:{{.Tag}}"]));
    for image in images.lines() {
        if of_a_killed_run(image, &[IMAGE_PREFIX]) {
            remove_image(image);
            eprintln!("removed {image}, left by a test run that was killed");
        }
    }
    for entry in fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if of_a_killed_run(&entry.file_name().to_string_lossy(), &TEMP_PREFIXES) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    for entry in fs::read_dir("/sys/fs/bpf").unwrap().flatten() {
        if of_a_killed_run(&entry.file_name().to_string_lossy(), &[BPFFS_DIR_PREFIX]) {
            drop(BpffsDir(entry.path()));
        }
    }
}

/// A directory of the host's bpffs given to the container as its /sys/fs/bpf; on drop the
/// pins of any collector under it are removed (`collector cleanup`: links first), then it.
struct BpffsDir(PathBuf);

impl BpffsDir {
    fn new() -> Self {
        let dir =
            PathBuf::from("/sys/fs/bpf").join(format!("{BPFFS_DIR_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        for entry in fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = Command::new(COLLECTOR)
                .args(["cleanup", "--apply", "--pin-dir"])
                .arg(entry.path())
                .output();
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A directory removed on drop, also when the test fails before its end.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A minimal Debian bookworm image standing in for `debian:bookworm-slim`.
fn base_image() {
    let exists = Command::new("podman")
        .args(["image", "exists", BASE])
        .status()
        .expect("podman (cargo xtask prereqs installs it)");
    if exists.success() {
        return;
    }
    let rootfs =
        TempDir(std::env::temp_dir().join(format!("{}{}", TEMP_PREFIXES[0], std::process::id())));
    run_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&rootfs.0)
            .arg(MIRROR),
    );
    run_ok(Command::new("sh").arg("-c").arg(format!(
        "tar -C {} -c . | podman import - {BASE}",
        rootfs.0.display()
    )));
}

/// The image built from the Containerfile; removed on drop.
struct Image(String);

impl Image {
    fn build() -> Self {
        let context = TempDir(std::env::temp_dir().join(format!(
            "{}{}",
            TEMP_PREFIXES[1],
            std::process::id()
        )));
        fs::create_dir_all(&context.0).unwrap();
        fs::copy(COLLECTOR, context.0.join("collector")).unwrap();
        let image = Self(format!("{IMAGE_PREFIX}{}", std::process::id()));
        let containerfile =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/container/Containerfile");
        // chroot isolation: RUN steps need no OCI runtime (see the module comment).
        let built = Command::new("podman")
            .args(["build", "--isolation", "chroot", "--build-arg"])
            .arg(format!("BASE={BASE}"))
            .arg("-f")
            .arg(&containerfile)
            .args(["-t", &image.0])
            .arg(&context.0)
            .output()
            .unwrap();
        drop(context);
        assert!(
            built.status.success(),
            "podman build:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        remove_image(&self.0);
    }
}

fn remove_image(image: &str) {
    let _ = Command::new("podman").args(["rmi", "-f", image]).output();
}

/// A container's writable root filesystem, mounted; unmounted and removed on drop.
struct Rootfs {
    container: String,
    path: PathBuf,
}

impl Rootfs {
    fn of(image: &Image) -> Self {
        let container = run_ok(Command::new("podman").args(["create", &image.0]));
        let path = PathBuf::from(run_ok(Command::new("podman").args(["mount", &container])));
        Self { container, path }
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        remove_container(&self.container);
    }
}

fn remove_container(container: &str) {
    let _ = Command::new("podman").args(["umount", container]).output();
    let _ = Command::new("podman")
        .args(["rm", "-f", container])
        .output();
}

/// The image's entrypoint as a runtime would start it: inside `netns`, in a private mount
/// namespace (gone with the process) holding the host's /sys (cgroup2) with `bpffs_dir`, a
/// directory of the host's bpffs, as its /sys/fs/bpf (as the manifests mount it), a fresh
/// /proc and the test's config directory, rooted at `rootfs`, with only the capabilities the
/// manifests add (`drop: ["ALL"]`, then `BPF`, `PERFMON` and `NET_ADMIN`; `tests/deploy.rs` checks
/// that they are what `collector check` requires). The shell execs, so the child is the agent.
fn launcher(
    netns: &Netns,
    rootfs: &Path,
    entrypoint: &str,
    config_dir: &Path,
    bpffs_dir: &Path,
) -> Command {
    let (root, config, bpffs) = (rootfs.display(), config_dir.display(), bpffs_dir.display());
    let mut command = netns.command("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --rbind /sys {root}/sys && mount --bind {bpffs} {root}/sys/fs/bpf \
         && mount -t proc proc {root}/proc \
         && mkdir -p {root}{config} && mount --bind {config} {root}{config} \
         && exec chroot {root} setpriv --bounding-set=-all,+bpf,+perfmon,+net_admin \
         --inh-caps=-all {entrypoint} \"$@\""
        ));
    command.arg("collector");
    command
}

#[test]
fn the_containerfile_builds_an_image_that_counts() {
    const CONNECTIONS: u32 = 5;
    let netns = Netns::new();
    sweep_killed_runs();
    base_image();
    let image = Image::build();
    let inspect = run_ok(Command::new("podman").args([
        "image",
        "inspect",
        &image.0,
        "--format",
        "{{.Config.Entrypoint}} {{.Config.Cmd}} {{.Config.StopSignal}}",
    ]));
    assert_eq!(inspect, "[/usr/local/bin/collector] [run] SIGTERM");
    let rootfs = Rootfs::of(&image);

    let config = AgentConfig::with_nft(&format!(
        "[[routes]]\nname = \"web\"\nports = [{PORT}]\ntype = \"http\"\n"
    ));
    let bpffs = BpffsDir::new();
    let agent = Agent::spawn(
        &netns,
        launcher(
            &netns,
            &rootfs.path,
            "/usr/local/bin/collector",
            &config.dir,
            &bpffs.0,
        ),
        &config,
        &[],
    );
    // The pins are in the directory given, where the host sees them, and nowhere else.
    let pins_on_the_host = bpffs.0.join(config.pin_dir.file_name().unwrap());
    assert!(
        pins_on_the_host.join("v1/PIN_OWNER").exists(),
        "{} holds no pins",
        pins_on_the_host.display()
    );
    assert!(!config.pin_dir.exists());
    let listener = netns.run(|| TcpListener::bind(("127.0.0.1", PORT)).unwrap());
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 4];
            stream.read_exact(&mut request).unwrap();
        }
    });
    netns.run(|| {
        for _ in 0..CONNECTIONS {
            TcpStream::connect(("127.0.0.1", PORT))
                .unwrap()
                .write_all(b"ping")
                .unwrap();
        }
    });
    server.join().unwrap();
    let route = [("route", "web")];
    let metrics = wait_for_closed(&netns, "web", CONNECTIONS);
    assert_eq!(
        sample(
            &metrics,
            "collector_proxy_connection_received_bytes_total",
            &route
        ),
        Some(f64::from(CONNECTIONS * 4))
    );
    // The image's nft made the agent's table, and the agent reads it.
    assert_eq!(
        sample(&metrics, "collector_source_up", &[("source", "nft")]),
        Some(1.0)
    );
    assert!(agent.stop().success());
    assert_no_pins(&pins_on_the_host);
}
