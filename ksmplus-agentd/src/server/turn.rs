//! One turn of the loop after the sockets: channel reads (finished batches, wake-ups, maps
//! refreshes), the sandbox fallback, the engine's commands executed, batches posted, kernel
//! feedback, background coverage figures.

use super::*;

impl Agent {
    pub(super) fn turn(&mut self) {
        let now = self.now_ms();
        // Commands queued since the last turn go out before this turn's work (the engine alone
        // may take TURN_BUDGET): above all a learned fork server's merge-any, queued at its
        // Hello, which must run before the server forks the children that are to inherit it
        // (Chromium's zygote host forks its zygote right after start).
        self.post_batches(now);
        self.clients_turn(now);
        self.families_turn(now);
        self.engine_turn();
        let now = self.now_ms();
        self.post_batches(now);
        if now >= self.feedback_at {
            self.feedback_at = now + FEEDBACK_MS;
            if self.engine.has_marked() {
                self.feedback();
            }
        }
        if now >= self.coverage_at && !self.clients.is_empty() {
            self.coverage_at = now + COVERAGE_EVERY_MS;
            self.refresh_one_coverage(now);
        }
        if now >= self.forget_at {
            self.forget_at = now + FORGET_EVERY_MS;
            self.forget_gone();
        }
        self.peers.expire(self.poll.registry(), now);
    }

    /// Channel reads: finished batches, wake-ups, `map_gen` checks and maps refreshes.
    pub(super) fn clients_turn(&mut self, now: u64) {
        let root = self.root();
        let min = self.engine.config().min_region_bytes;
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        let mut gone = Vec::new();
        for id in ids {
            let c = self.clients.get_mut(&id).unwrap();
            let batch_due = c.posted.as_ref().is_some_and(|p| now >= p.check_ms);
            if !batch_due && now < c.check_at_ms {
                continue;
            }
            if c.refresh().is_none() {
                gone.push(id);
                continue;
            }
            if let Some(results) = c.take_done() {
                self.batch_done(id, results, now);
            }
            let c = self.clients.get_mut(&id).unwrap();
            let (cpid, snap) = (c.pid(), &c.last);
            if let Some(p) = c.posted.as_mut() {
                let wake_due = if p.wakes == 0 {
                    p.at_ms + WAKE_AFTER_MS
                } else {
                    p.last_wake_ms + WAKE_AGAIN_MS
                };
                p.check_ms = now + p.every_ms;
                p.every_ms = (p.every_ms * 2).min(crate::client::BATCH_POLL_MAX_MS);
                if now >= wake_due && p.wakes < MAX_WAKES {
                    p.wakes += 1;
                    p.last_wake_ms = now;
                    match crate::wake::wake(&root, cpid, snap) {
                        Ok(tid) => {
                            self.stats.wakes += 1;
                            // Look again soon: the handler runs at once.
                            p.check_ms = now + crate::client::BATCH_POLL_MIN_MS;
                            p.every_ms = crate::client::BATCH_POLL_MIN_MS;
                            debug!("pid {cpid}: woke thread {tid}");
                        }
                        Err(why) => debug!("pid {cpid}: no wake-up: {why:?}"),
                    }
                }
                if p.wakes < MAX_WAKES {
                    p.check_ms = p.check_ms.min(if p.wakes == 0 {
                        p.at_ms + WAKE_AFTER_MS
                    } else {
                        p.last_wake_ms + WAKE_AGAIN_MS
                    });
                }
            }
            let c = self.clients.get_mut(&id).unwrap();
            c.trim_if_idle(now);
            if now >= c.check_at_ms {
                let changed = c.last.map_gen != c.map_gen_seen;
                let moves = c.last.moves_head.saturating_sub(c.moves_seen);
                if crate::client::maps_due(
                    changed,
                    moves,
                    now,
                    c.maps_read_ms,
                    c.maps_gap_ms,
                    c.maps_age_ms,
                ) {
                    c.map_gen_seen = c.last.map_gen;
                    c.maps_read_ms = now;
                    match procfs::read_maps(&root, c.pid()) {
                        Ok(text) if c.proc.alive() => {
                            c.refresh_stacks(&root);
                            let evs = c.maps_events(&text, min);
                            let busy = !evs.is_empty();
                            for ev in evs {
                                self.engine.on_event(id, ev, now);
                            }
                            let c = self.clients.get_mut(&id).unwrap();
                            c.maps_age_ms =
                                crate::client::next_maps_age(c.maps_age_ms, busy || changed);
                            c.maps_gap_ms =
                                crate::client::next_maps_gap(c.maps_gap_ms, busy, c.settled(now));
                            let changed = changed && c.maps_gap_ms == 0;
                            // No faster than the gap lets a change be read.
                            c.check_every_ms = if busy || changed {
                                crate::client::CHECK_MIN_MS
                                    .max(c.maps_gap_ms)
                                    .min(c.max_check_ms())
                            } else {
                                (c.check_every_ms * 2).min(c.max_check_ms())
                            };
                        }
                        _ => {
                            gone.push(id);
                            continue;
                        }
                    }
                } else {
                    c.check_every_ms = (c.check_every_ms * 2).min(c.max_check_ms());
                }
                let c = self.clients.get_mut(&id).unwrap();
                c.check_at_ms = now + c.check_every_ms;
            }
        }
        for id in gone {
            self.remove_client(id, "gone");
        }
    }

    pub(super) fn batch_done(&mut self, id: ClientId, results: Vec<(Item, i32)>, now: u64) {
        for (item, res) in results {
            match item {
                Item::Engine(rid) => {
                    let status = if res == 0 {
                        Status::Ok
                    } else {
                        Status::Errno(res)
                    };
                    self.engine
                        .on_reply(id, Reply::Madvise { id: rid, status }, now);
                    if refused(res) {
                        self.sandbox_refuses(id, res);
                    }
                }
                Item::Trim => {}
                Item::MergeAny(on) => {
                    if let Some(c) = self.clients.get_mut(&id) {
                        if res == 0 {
                            c.merge_any = on;
                            info!(
                                "pid {}: merge-any {}",
                                c.pid(),
                                if on { "on" } else { "off" }
                            );
                        } else {
                            warn!("pid {}: PR_SET_MEMORY_MERGE refused: errno {res}", c.pid());
                        }
                    }
                }
            }
        }
    }

    /// The process's sandbox refuses KSM advice: stop sampling it (nothing could be marked),
    /// and apply the fallback to the process it was forked from.
    pub(super) fn sandbox_refuses(&mut self, id: ClientId, errno: i32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if matches!(c.sandbox, Sandbox::Refuses(_)) {
            return;
        }
        c.sandbox = Sandbox::Refuses(errno);
        c.queue.retain(|(i, _)| !matches!(i, Item::Engine(_)));
        let (pid, ppid) = (c.pid(), c.ppid);
        if errno == 0 {
            info!("pid {pid}: under a seccomp filter: no KSM advice is sent to it");
        } else {
            info!("pid {pid}: its sandbox refuses KSM advice (errno {errno})");
        }
        self.engine.remove_client(id);
        if self.policy.sandbox_fallback != SandboxFallback::MergeAny {
            return;
        }
        let root = self.root();
        // The nearest tracked ancestor: Chromium's zygote, which forks the renderers, is itself
        // an idle fork child of the tracked zygote host and often never adopted (no hook runs in
        // it); the host then gets the fallback, and through the learned store its next zygote
        // and every renderer inherit merge-any from the browser's next start on.
        let mut up = ppid;
        let mut found = None;
        for _ in 0..3 {
            if let Some(&id) = self.by_pid.get(&up) {
                found = Some(id);
                break;
            }
            match procfs::read_status(&root, up) {
                Ok(st) if st.ppid > 1 => up = st.ppid,
                _ => break,
            }
        }
        let Some(pid_c) = found else {
            return;
        };
        let Some(parent) = self.clients.get_mut(&pid_c) else {
            return;
        };
        // Only a parent without a seccomp filter (prctl is refused, or fatal, under one), and
        // only a fork server: single-threaded (Chromium's zygote), not a program that
        // happens to fork one sandboxed helper (Firefox's parent forks its socket process):
        // merge-any applies to the parent's own memory too.
        let st = match procfs::read_status(&root, parent.pid()) {
            Ok(s) => s,
            Err(e) => {
                debug!("pid {}: status: {e}", parent.pid());
                return;
            }
        };
        if st.seccomp != 0 || st.threads != 1 {
            debug!(
                "pid {}: no merge-any fallback (seccomp {}, {} threads)",
                parent.pid(),
                st.seccomp,
                st.threads,
            );
            return;
        }
        let key = parent.key.clone();
        let n = self.fallback.entry(pid_c).or_insert(0);
        *n += 1;
        if *n == 1 && !parent.merge_any {
            info!(
                "pid {}: children forked from it refuse marks (pid {pid}): merge-any for its next children",
                parent.pid()
            );
            parent.queue_op(Item::MergeAny(true));
        }
        self.learned.set_fork_server(&key, true);
    }

    /// Runs the engine and executes what it asks: residency and fingerprints here and now,
    /// marks into the client's mailbox. Bounded by [`TURN_BUDGET`].
    pub(super) fn engine_turn(&mut self) {
        let t0 = Instant::now();
        // The first tick looks at every client; the next ones only at those that just got a
        // reply (the rest had nothing to do a moment ago).
        let mut replied: Option<Vec<ClientId>> = None;
        loop {
            let now = self.now_ms();
            match replied.take() {
                None => self.engine.tick(now),
                Some(ids) => self.engine.tick_clients(now, &ids),
            }
            let out = self.engine.take_output();
            if out.is_empty() {
                break;
            }
            replied = Some(out.iter().map(|(id, _)| *id).collect());
            for (id, cmd) in out {
                let Some(c) = self.clients.get_mut(&id) else {
                    continue;
                };
                let reply = match cmd {
                    Command::Residency {
                        id: rid,
                        start,
                        len,
                    } => {
                        match c
                            .proc
                            .residency(start, len, crate::engine::MAX_RESIDENCY_RUNS)
                        {
                            Ok((covered, runs)) => Reply::Residency {
                                id: rid,
                                status: Status::Ok,
                                covered,
                                runs,
                            },
                            Err(e) => Reply::Residency {
                                id: rid,
                                status: Status::Errno(e.raw_os_error().unwrap_or(libc::EIO)),
                                covered: len,
                                runs: Vec::new(),
                            },
                        }
                    }
                    Command::Fingerprint { id: rid, pages } => Reply::Fingerprint {
                        id: rid,
                        status: Status::Ok,
                        hashes: c.proc.hashes(&pages, c.page_size),
                    },
                    m @ Command::Madvise { .. } => {
                        c.queue_engine(&m);
                        continue;
                    }
                };
                self.engine.on_reply(id, reply, now);
            }
            if t0.elapsed() >= TURN_BUDGET {
                break;
            }
        }
    }

    pub(super) fn post_batches(&mut self, now: u64) {
        let root = self.root();
        let mut gone = Vec::new();
        let mut filtered = Vec::new();
        for (id, c) in self.clients.iter_mut() {
            if c.posted.is_some() || c.queue.is_empty() {
                continue;
            }
            // A seccomp filter may kill the process for a system call it does not expect
            // (Firefox's utility processes trap MADV_MERGEABLE and die of SIGSYS), and there
            // is no way to ask a filter what it would do. A process may install one at any
            // time, so its state is read again right before each batch: under a filter,
            // nothing but cache trims (`MADV_DONTNEED` and munmap, which every allocator needs) is
            // ever posted.
            // A filter the process was exec'd with (a launcher's: bubblewrap, flatpak) is the
            // exception, as long as the process adds none (its shim says so in the flags).
            match procfs::read_status(&root, c.pid()) {
                Ok(st) => (c.seccomp, c.seccomp_filters) = (st.seccomp, st.seccomp_filters),
                Err(_) => c.seccomp = 1,
            }
            let mut flags = [0u8; 4];
            if c.proc
                .read(c.channel + channel::offsets::FLAGS as u64, &mut flags)
                .is_ok()
            {
                c.last.flags = u32::from_ne_bytes(flags);
            }
            if c.filtered() {
                c.queue.retain(|(i, _)| matches!(i, Item::Trim));
                filtered.push(*id);
            }
            match c.post(now) {
                Ok(true) => c.check_at_ms = c.check_at_ms.min(now + WAKE_AFTER_MS),
                Ok(false) => {}
                Err(e) => {
                    debug!("pid {}: cannot post a batch: {e}", c.pid());
                    gone.push(*id);
                }
            }
        }
        for id in gone {
            self.remove_client(id, "channel unwritable");
        }
        for id in filtered {
            self.sandbox_refuses(id, 0);
        }
    }

    /// Kernel feedback: ksmd's full_scans and, for clients with runs due, how much of each due
    /// run is merged and where it did not merge, from the pagemap of the run alone
    /// ([`procfs::ProcHandle::sharing`]):
    /// a check costs in proportion to the runs checked, not to the process (smaps, which this
    /// read before, walks and formats all of it: 40 % of the agent's CPU once converged on D1).
    pub(super) fn feedback(&mut self) {
        let root = self.root();
        let Ok(scans) = ksm::read_sysfs(&root, "full_scans") else {
            return;
        };
        self.engine.set_full_scans(scans.max(0) as u64);
        for id in self.engine.due_checks() {
            let Some(c) = self.clients.get(&id) else {
                continue;
            };
            let ps = c.page_size;
            let mut lone = Vec::new();
            let merged: io::Result<Vec<(u64, u64, u64)>> = self
                .engine
                .due_ranges(id)
                .into_iter()
                .map(|(a, b)| {
                    let s = c.proc.sharing(a, b, ps, crate::engine::MIN_TRIM_PAGES)?;
                    lone.extend(s.lone);
                    Ok((a, b, s.shared * ps / 1024))
                })
                .collect();
            match merged {
                Ok(_) if !c.proc.alive() => {
                    debug!("pid {}: exited while its pagemap was read", c.pid())
                }
                Ok(v) => self.engine.feedback(id, &v, &lone),
                Err(e) => debug!("pid {}: pagemap: {e}", c.pid()),
            }
        }
    }

    /// Coverage figures of the client whose figures are oldest (and older than the limit).
    pub(super) fn refresh_one_coverage(&mut self, now: u64) {
        let root = self.root();
        let oldest = self
            .clients
            .keys()
            .map(|id| {
                let at = self
                    .figures
                    .get(id)
                    .and_then(|f| f.coverage.as_ref().map(|c| c.1))
                    .unwrap_or(0);
                (at, *id)
            })
            .min();
        let Some((at, id)) = oldest else { return };
        if at != 0 && now < at + COVERAGE_MAX_AGE_MS {
            return;
        }
        let c = &self.clients[&id];
        if let Ok(vmas) = ksm::read_smaps(&root, c.pid()) {
            if c.proc.alive() {
                let cov = control::coverage_of(c, &vmas);
                self.figures.entry(id).or_default().coverage = Some((cov, now));
            }
        }
    }
}
