//! Starting a local service for tests and benches (moto, `docker-registry`): on a free port of
//! 127.0.0.1, retried on another port when the chosen one was taken between choosing and
//! binding. Included with `#[path]` by tests/registry_s3.rs, tests/registry_oci.rs and
//! benches/common/registry.rs.

use std::process::Child;
use std::time::{Duration, Instant};

/// Start `what` with `spawn(port)` until `ready(port)` holds (up to 30 s per try), on up to 5
/// free ports; the running child and its port. Panics when it never becomes ready.
pub fn start_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> Child,
    ready: impl Fn(u16) -> bool,
) -> (Child, u16) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = spawn(port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break; // port taken between bind and spawn: try another
            }
            if ready(port) {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{what} did not start");
}
