//! `harness-agent SOCKET [track|ignore|silent]`: runs a [`HarnessAgent`] on SOCKET until stdin
//! closes, then prints one line per client (`client=I pid=P msgs=N regions=R`) and `clients=N`.
//! Tests start it as another user (e.g. nobody) to check how shims treat a foreign agent.
use ksmplus_tests::{HarnessAgent, HelloAnswer};
use std::io::Read;

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
    let agent = HarnessAgent::start_at(std::path::Path::new(&path));
    agent.set_answer(answer);
    println!("listening");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
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
