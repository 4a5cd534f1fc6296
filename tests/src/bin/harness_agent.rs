//! `harness-agent SOCKET [track|ignore|silent]`: runs a [`HarnessAgent`] on SOCKET, prints
//! `listening`, then `accepted=N` each time a connection comes in; when stdin closes it prints one
//! line per client (`client=I pid=P msgs=N regions=R`, pid -1 without Hello) and `clients=N`.
//! Tests start it as another user (e.g. nobody) to check how shims treat a foreign agent.
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
        None | Some("track") => HelloAnswer::Track(0),
        Some("ignore") => HelloAnswer::Ignore,
        Some("silent") => HelloAnswer::Silent,
        Some(x) => panic!("unknown answer {x}"),
    };
    let agent = Arc::new(HarnessAgent::start_at(std::path::Path::new(&path)));
    agent.set_answer(answer);
    println!("listening");
    let done = Arc::new(AtomicBool::new(false));
    let (a, d) = (agent.clone(), done.clone());
    let watcher = std::thread::spawn(move || {
        let mut seen = 0;
        while !d.load(Ordering::SeqCst) {
            // Wakes on every recorded event; the timeout only bounds how late `done` is noticed.
            let n = a
                .try_wait_for(Duration::from_millis(200), |s| {
                    (s.clients.len() > seen).then_some(s.clients.len())
                })
                .unwrap_or(seen);
            if n > seen {
                seen = n;
                println!("accepted={n}");
                let _ = std::io::stdout().flush();
            }
        }
    });
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    done.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    let st = agent.state();
    for c in &st.clients {
        println!(
            "client={} pid={} msgs={} regions={}",
            c.index,
            c.pid().map_or(-1, |p| p as i64),
            c.messages.len(),
            c.regions().len()
        );
    }
    println!("clients={}", st.clients.len());
}
