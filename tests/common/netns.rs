//! A network namespace joined to the test's by a veth pair, with a kernel `tbf` on the
//! namespace's end: a server started inside it (`Server::start_in_netns`) reaches the test's
//! clients only through that queue, so what it sends them is limited the way a narrow link
//! limits it (rate, a queue of bounded latency, tail drop). Needs root (`ip netns`, `tc`);
//! [`Netns::create`] says why when it cannot, and tests then skip. Removed on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Netns {
    pub name: String,
    root_if: String,
    ns_if: String,
    /// The test's side of the link (bind clients here).
    pub root_ip: String,
    /// The namespace's side (the server's address).
    pub ns_ip: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    pub fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // A /30 per namespace: 10.231.<pid>.<4n>, interface names within 15 characters.
        let (a, b) = (pid % 250, (n % 60) * 4);
        let ns = Netns {
            name: format!("cohost-test-{pid}-{n}"),
            root_if: format!("vc{}r{n}", pid % 100_000),
            ns_if: format!("vc{}n{n}", pid % 100_000),
            root_ip: format!("10.231.{a}.{}", b + 1),
            ns_ip: format!("10.231.{a}.{}", b + 2),
        };
        run(&["ip", "netns", "add", &ns.name])?;
        let setup = || -> Result<(), String> {
            run(&[
                "ip",
                "link",
                "add",
                &ns.root_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_if,
            ])?;
            run(&["ip", "link", "set", &ns.ns_if, "netns", &ns.name])?;
            run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/30", ns.root_ip),
                "dev",
                &ns.root_if,
            ])?;
            run(&["ip", "link", "set", &ns.root_if, "up"])?;
            let n = ns.name.as_str();
            run(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/30", ns.ns_ip),
                "dev",
                &ns.ns_if,
            ])?;
            run(&["ip", "-n", n, "link", "set", &ns.ns_if, "up"])?;
            run(&["ip", "-n", n, "link", "set", "lo", "up"])
        };
        setup()?;
        Ok(ns)
    }

    /// Limit what leaves the namespace to `kbit` per second (`tbf`, 16 KB burst, 400 ms of
    /// queue), or lift the limit.
    pub fn limit(&self, kbit: Option<u64>) -> Result<(), String> {
        match kbit {
            Some(k) => run(&[
                "tc",
                "-n",
                &self.name,
                "qdisc",
                "replace",
                "dev",
                &self.ns_if,
                "root",
                "tbf",
                "rate",
                &format!("{k}kbit"),
                "burst",
                "16kb",
                "latency",
                "400ms",
            ]),
            None => run(&[
                "tc",
                "-n",
                &self.name,
                "qdisc",
                "del",
                "dev",
                &self.ns_if,
                "root",
            ]),
        }
    }

    /// Packets the `tbf` dropped so far (0 without a limit).
    pub fn dropped(&self) -> u64 {
        let Ok(out) = Command::new("tc")
            .args(["-n", &self.name, "-s", "qdisc", "show", "dev", &self.ns_if])
            .output()
        else {
            return 0;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // "Sent 123 bytes 4 pkt (dropped 5, overlimits 6 requeues 0)"
        text.split("dropped ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.root_if]);
    }
}
