//! `harness-agent SOCKET [track|ignore|silent]`: runs a [`HarnessAgent`] on SOCKET, prints
//! `listening`, then `accepted=N` each time a connection comes in and `hello pid=P uid=U
//! comm=C` for each Hello received; when stdin closes it prints `hellos=N` (Hellos received) and
//! `errors=N` (connections without a valid Hello). Tests start it as another user (e.g. nobody)
//! to check how shims treat a foreign agent, or as the user of a sandboxed program.
use ksmplus_tests::{HarnessAgent, HelloAnswer};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: harness-agent SOCKET [track|ignore|silent]");
    let answer = match args.next().as_deref() {
        None | Some("track") => HelloAnswer::Track,
        Some("ignore") => HelloAnswer::Ignore,
        Some("silent") => HelloAnswer::Silent,
        Some(x) => panic!("unknown answer {x}"),
    };
    let agent = Arc::new(HarnessAgent::start_at(std::path::Path::new(&path)));
    agent.set_answer(answer);
    println!("listening");
    let _ = std::io::stdout().flush();
    let done = Arc::new(AtomicBool::new(false));
    let (a, d) = (agent.clone(), done.clone());
    let watcher = std::thread::spawn(move || {
        let (mut seen, mut hellos) = (0, 0);
        while !d.load(Ordering::SeqCst) {
            let st = a.state();
            if st.accepted > seen {
                seen = st.accepted;
                println!("accepted={seen}");
            }
            for h in &st.hellos[hellos..] {
                println!(
                    "hello pid={} uid={} comm={}",
                    h.peer.pid, h.peer.uid, h.hello.comm
                );
            }
            hellos = st.hellos.len();
            drop(st);
            let _ = std::io::stdout().flush();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let st = agent.state();
    println!("hellos={}", st.hellos.len());
    println!("errors={}", st.errors.len());
}
