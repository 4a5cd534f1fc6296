//! Which processes the agent tracks: a Hello, a family's doorbell and process tree, the anchor
//! scan at start; the policy's verdict; forgetting a process that exited.

use super::*;

impl Agent {
    pub(super) fn new_id(&mut self) -> ClientId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub(super) fn on_hello(&mut self, pid: u32, hello: Hello) {
        if let Some(&id) = self.by_pid.get(&pid) {
            // The same pid after an exec: the old image's channel is gone.
            let stale = self
                .clients
                .get_mut(&id)
                .is_none_or(|c| c.refresh().is_none() || c.nonce != hello.nonce);
            if !stale {
                return;
            }
            self.remove_client(id, "exec'd");
        }
        self.dormant.remove(&pid);
        let id = self.new_id();
        match Client::adopt(&self.root(), id, pid, hello.channel, Some(hello.nonce)) {
            Ok((mut c, maps)) => {
                c.hello = true;
                if !hello.comm.is_empty() {
                    c.comm = hello.comm;
                }
                if !hello.exe.is_empty() {
                    c.exe = hello.exe;
                }
                self.admit(c, &maps);
            }
            Err(e) => {
                debug!("Hello from pid {pid} not taken: {e}");
                if matches!(e, AdoptError::Proc(ProcError::Denied { .. }))
                    && self.policy.decide(&hello.comm, &hello.exe) == Decision::Track
                {
                    warn!(
                        "pid {pid} ({}) asked to be tracked and cannot be: {e}",
                        hello.comm
                    );
                    self.unreadable.insert(
                        pid,
                        Unreadable {
                            comm: hello.comm,
                            exe: hello.exe,
                            reason: e.to_string(),
                        },
                    );
                }
            }
        }
    }

    /// True if `pid` was found to have no shim of this agent's, and has not exec'd since.
    fn known_no_shim(&mut self, pid: u32) -> bool {
        let Some(then) = self.no_shim.get(&pid) else {
            return false;
        };
        let (now, _) = procfs::comm_exe(&self.root(), pid);
        if *then == now {
            return true;
        }
        self.no_shim.remove(&pid);
        false
    }

    fn set_no_shim(&mut self, pid: u32) {
        let (comm, _) = procfs::comm_exe(&self.root(), pid);
        self.no_shim.insert(pid, comm);
    }

    /// Forgets untracked pids whose process exited (a reused pid must be looked at afresh).
    pub(crate) fn forget_gone(&mut self) {
        let root = self.root();
        let alive = |pid: &u32| procfs::exists(&root, *pid);
        self.dormant.retain(|pid, _| alive(pid));
        self.no_shim.retain(|pid, _| alive(pid));
        self.unreadable.retain(|pid, _| alive(pid));
    }

    /// Decides a new process by the policy and tracks it or lets its shim go dormant.
    pub(super) fn admit(&mut self, mut c: Client, maps_text: &str) {
        let decision = self.policy.decide(&c.comm, &c.exe);
        let pid = c.pid();
        if decision != Decision::Track {
            if decision == Decision::Excluded {
                self.stats.excluded += 1;
            } else {
                self.stats.ignored += 1;
            }
            if let Err(e) = c.set_verdict(verdict::IGNORE) {
                debug!("pid {pid}: cannot write its verdict: {e}");
            }
            debug!(
                "not tracking pid {pid} ({} {}): {decision:?}",
                c.comm, c.exe
            );
            self.dormant.insert(
                pid,
                Dormant {
                    channel: c.channel,
                    nonce: c.nonce,
                    comm: c.comm.clone(),
                    exe: c.exe.clone(),
                },
            );
            return;
        }
        let now = self.now_ms();
        // A learned fork server (Chromium's zygote) forks its children right after start, and
        // only children forked after it ran PR_SET_MEMORY_MERGE inherit the mode. Its shim waits
        // for the verdict before a fork and then runs the whole waiting batch, so the batch is
        // posted *before* the verdict: a shim that sees the verdict sees the batch too.
        c.key = crate::learned::key_of(&self.root(), pid, &c.exe);
        let merge_any = self.policy.sandbox_fallback == SandboxFallback::MergeAny
            && c.seccomp == 0
            && self.learned.is_fork_server(&c.key);
        if merge_any {
            c.queue_op(Item::MergeAny(true));
            // On failure the op stays queued: `post_batches` tries again (and forgets a
            // client whose channel cannot be written).
            if let Err(e) = c.post(now) {
                debug!("pid {pid}: cannot post its merge-any before the verdict: {e}");
            }
        }
        if let Err(e) = c.set_verdict(verdict::TRACK) {
            debug!("pid {pid}: cannot write its verdict: {e}");
            return;
        }
        let id = c.id;
        if self
            .poll
            .registry()
            .register(
                &mut SourceFd(&c.proc.pidfd()),
                Token(PIDFD_BASE + id as usize),
                Interest::READABLE,
            )
            .is_err()
        {
            return;
        }
        info!(
            "tracking pid {pid} ({} {}){}",
            c.comm,
            c.exe,
            if c.hello { "" } else { ", found without Hello" }
        );
        if !c.hello {
            self.stats.adopted += 1;
        }
        self.dormant.remove(&pid);
        self.engine.add_client(id, pid, &c.comm, c.page_size, now);
        let min = self.engine.config().min_region_bytes;
        c.refresh_stacks(&self.root());
        for ev in c.maps_events(maps_text, min) {
            self.engine.on_event(id, ev, now);
        }
        c.maps_read_ms = now;
        c.tracked_ms = now;
        c.check_at_ms = now + crate::client::CHECK_MIN_MS;
        if c.filtered() {
            // Under a seccomp filter: never advised (see `post_batches`); the fallback may
            // apply to the process it was forked from.
            c.queue_op(Item::Trim);
        }
        if merge_any {
            info!(
                "pid {pid}: a fork server whose children refuse marks (learned): merge-any for them"
            );
            self.fallback.insert(id, 0);
        }
        if c.posted.is_some() {
            c.check_at_ms = c.check_at_ms.min(now + WAKE_AFTER_MS);
        }
        if c.family != 0 {
            let f = self.families.entry(c.family).or_insert_with(|| Family {
                socket_hash: c.last.socket_hash,
                born_ms: now,
                doorbell: c.doorbell,
                channel: c.channel,
                rings_seen: 0,
                rang_ms: now,
                doorbell_at: now,
                walk_at: now + FAMILY_WALK_YOUNG_MS,
                members: BTreeSet::new(),
                pending: BTreeMap::new(),
                idle: BTreeSet::new(),
                tree: BTreeSet::new(),
                dirty: true,
                walked_ms: now,
            });
            f.members.insert(id);
            f.pending.remove(&pid);
            // Its children are the family's from now on (it may have some already).
            if f.tree.insert(pid) {
                f.dirty = true;
            }
        }
        self.by_pid.insert(pid, id);
        self.clients.insert(id, c);
    }

    pub(super) fn remove_client(&mut self, id: ClientId, why: &str) {
        let Some(c) = self.clients.remove(&id) else {
            return;
        };
        debug!("pid {} forgotten: {why}", c.pid());
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&c.proc.pidfd()));
        self.by_pid.remove(&c.pid());
        self.engine.remove_client(id);
        self.figures.remove(&id);
        self.fallback.remove(&id);
        if let Some(f) = self.families.get_mut(&c.family) {
            f.members.remove(&id);
            if f.members.is_empty() {
                self.families.remove(&c.family);
            }
        }
    }

    /// At start: every process of this user that has the shim loaded (started before the agent,
    /// or unable to reach the socket) is found through its anchor.
    pub(super) fn adopt_running(&mut self) {
        let root = self.root();
        let Ok(dir) = std::fs::read_dir(root.join("proc")) else {
            return;
        };
        let me = std::process::id();
        let mut pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&p| p != me)
            .collect();
        pids.sort_unstable();
        for pid in pids {
            use std::os::unix::fs::MetadataExt;
            let owned = std::fs::metadata(root.join(format!("proc/{pid}")))
                .is_ok_and(|m| m.uid() == self.uid || self.uid == 0);
            if owned {
                self.adopt_by_anchor(pid, None);
            }
        }
    }

    /// Finds a process's channel through the anchor in the shim's data and admits it.
    pub(super) fn adopt_by_anchor(&mut self, pid: u32, family_hash: Option<u64>) -> bool {
        if self.by_pid.contains_key(&pid) || self.known_no_shim(pid) {
            return false;
        }
        let root = self.root();
        let Ok(text) = procfs::read_maps(&root, pid) else {
            return false;
        };
        if maps::shim_data(&maps::parse(&text)).is_empty() {
            self.set_no_shim(pid);
            return false;
        }
        let Ok(h) = procfs::ProcHandle::open(&root, pid) else {
            return false;
        };
        let found = procfs::find_channel(&h, &text);
        drop(h);
        let Some((ch, _)) = found else {
            return false;
        };
        let id = self.new_id();
        match Client::adopt(&root, id, pid, ch, None) {
            Ok((c, maps)) => {
                // Only a process started for this agent's socket (or a descendant of one of
                // its families): another agent of the same uid serves the others.
                let h = c.last.socket_hash;
                if h != self.socket_hash && Some(h) != family_hash {
                    debug!("pid {pid}: its shim was started for another agent's socket");
                    self.set_no_shim(pid);
                    return false;
                }
                if c.last.verdict == verdict::IGNORE
                    && self.policy.decide(&c.comm, &c.exe) != Decision::Track
                {
                    self.set_no_shim(pid);
                    return false;
                }
                self.admit(c, &maps);
                true
            }
            Err(e) => {
                debug!("pid {pid}: {e}");
                false
            }
        }
    }

    /// Reads each family's doorbell; a ring (or the periodic walk) looks for new processes
    /// among the descendants of its members.
    pub(super) fn families_turn(&mut self, now: u64) {
        if self.families.values().any(|f| now >= f.walk_at && !f.dirty) {
            self.look_at_births();
        }
        let keys: Vec<u64> = self.families.keys().copied().collect();
        for key in keys {
            let Some(f) = self.families.get_mut(&key) else {
                continue;
            };
            // A due walk with nothing born into the tree since the last one would find nothing
            // new (a new process is a new pid): put it off, up to FAMILY_WALK_MAX_MS.
            let due = now >= f.walk_at;
            if due && !f.dirty && now < f.walked_ms + FAMILY_WALK_MAX_MS {
                f.walk_at = now + f.walk_pace(now);
                self.stats.walks_skipped += 1;
            }
            let f = &self.families[&key];
            let mut walk = due && f.walk_at <= now;
            let retry = !f.pending.is_empty() && now >= f.doorbell_at;
            let mut rang = false;
            if now >= f.doorbell_at {
                let rings = f.members.iter().find_map(|m| {
                    let c = self.clients.get(m)?;
                    let mut b = [0u8; 8];
                    c.proc
                        .read(f.doorbell + channel::offsets::DOORBELL_RINGS as u64, &mut b)
                        .ok()
                        .map(|()| u64::from_ne_bytes(b))
                });
                let f = self.families.get_mut(&key).unwrap();
                // A young family forks its first children now: look more often.
                f.doorbell_at = now
                    + if now < f.born_ms + YOUNG_FAMILY_MS {
                        DOORBELL_YOUNG_MS
                    } else {
                        DOORBELL_MS
                    };
                if let Some(r) = rings {
                    if r != f.rings_seen {
                        f.rings_seen = r;
                        f.rang_ms = now;
                        walk = true;
                        rang = true;
                    }
                }
            }
            if walk {
                self.walk_family(key, now, rang);
            } else if retry {
                self.retry_pending(key);
            }
        }
    }

    /// Looks at every descendant of the family's members: a fork child with an initialised
    /// channel joins; an exec'd descendant with a shim is adopted through its anchor.
    pub(super) fn walk_family(&mut self, key: u64, now: u64, rang: bool) {
        let root = self.root();
        let Some(join) = self.joining(key) else {
            return;
        };
        let f = self.families.get_mut(&key).unwrap();
        f.walk_at = now + f.walk_pace(now);
        f.walked_ms = now;
        f.dirty = false;
        self.stats.walks += 1;
        let mut frontier: Vec<u32> = f
            .members
            .iter()
            .filter_map(|m| self.clients.get(m).map(|c| c.pid()))
            .collect();
        let mut seen: BTreeSet<u32> = frontier.iter().copied().collect();
        let mut pending = std::mem::take(&mut f.pending);
        let mut idle = std::mem::take(&mut f.idle);
        while let Some(pid) = frontier.pop() {
            for child in procfs::children(&root, pid) {
                if !seen.insert(child) {
                    continue;
                }
                frontier.push(child);
                if self.known(child) || idle.contains(&child) && !rang {
                    continue;
                }
                self.consider_child(&root, child, &join, &mut pending, &mut idle);
            }
        }
        if let Some(f) = self.families.get_mut(&key) {
            pending.retain(|p, _| seen.contains(p));
            idle.retain(|p| seen.contains(p));
            f.pending = pending;
            f.idle = idle;
            f.tree = seen;
        }
    }

    /// Looks again at the family's pending children alone (no walk of its tree: a walk reads
    /// the `children` of every thread of every process in it, and a family with children that
    /// never set up a channel — epiphany's bubblewrap helpers — was walked every 500 ms for
    /// 10 s). A child's own children, if any, are births, which make the family walk.
    pub(super) fn retry_pending(&mut self, key: u64) {
        let root = self.root();
        let Some(join) = self.joining(key) else {
            return;
        };
        let f = self.families.get_mut(&key).unwrap();
        let mut pending = std::mem::take(&mut f.pending);
        let mut idle = std::mem::take(&mut f.idle);
        let pids: Vec<u32> = pending.keys().copied().collect();
        for child in pids {
            if self.known(child) || !procfs::exists(&root, child) {
                pending.remove(&child);
                continue;
            }
            self.consider_child(&root, child, &join, &mut pending, &mut idle);
        }
        if let Some(f) = self.families.get_mut(&key) {
            f.pending = pending;
            f.idle = idle;
        }
    }

    /// Whether the agent knows `pid` already: tracked, dormant, or without a shim.
    fn known(&mut self, pid: u32) -> bool {
        self.by_pid.contains_key(&pid) || self.dormant.contains_key(&pid) || self.known_no_shim(pid)
    }

    /// What a descendant of family `key` must show to join it (`None`: no such family).
    fn joining(&self, key: u64) -> Option<Joining> {
        let f = self.families.get(&key)?;
        Some(Joining {
            channel: f.channel,
            socket_hash: f.socket_hash,
            nonces: f
                .members
                .iter()
                .filter_map(|m| self.clients.get(m).map(|c| c.nonce))
                .collect(),
        })
    }

    /// One look at an untracked descendant of a family: a fork child whose channel is set up
    /// joins it; an exec'd program with a shim is adopted through its anchor; anything else
    /// is counted as a try (`pending`; `idle` after 20).
    fn consider_child(
        &mut self,
        root: &std::path::Path,
        child: u32,
        join: &Joining,
        pending: &mut BTreeMap<u32, u32>,
        idle: &mut BTreeSet<u32>,
    ) {
        let id = self.new_id();
        match Client::adopt(root, id, child, join.channel, None) {
            Ok((c, maps))
                if join.nonces.contains(&c.parent_nonce)
                    && c.last.socket_hash == join.socket_hash =>
            {
                pending.remove(&child);
                idle.remove(&child);
                self.admit(c, &maps);
            }
            _ => {
                // Not initialised yet (no hook ran in it), or an exec'd program with a
                // channel of its own.
                if !self.adopt_by_anchor(child, Some(join.socket_hash)) {
                    let tries = pending.entry(child).or_insert(0);
                    *tries += 1;
                    if *tries > 20 {
                        pending.remove(&child);
                        idle.insert(child);
                    }
                }
            }
        }
    }

    /// Marks `dirty` every family a process was born into since the last look (a new pid whose
    /// parent is in its tree, or in the tree through another new pid); every family when the
    /// agent cannot tell (no `/proc/loadavg`, the pids wrapped, too many births).
    fn look_at_births(&mut self) {
        let root = self.root();
        let last = procfs::last_pid(&root);
        let b = &mut self.births;
        let fresh = match (b.cursor, last) {
            (Some(c), Some(l)) if l >= c && l - c <= MAX_BIRTHS => Some(c + 1..=l),
            _ => None,
        };
        b.cursor = last;
        let Some(fresh) = fresh else {
            b.recheck.clear();
            for f in self.families.values_mut() {
                f.dirty = true;
            }
            return;
        };
        let again = std::mem::take(&mut b.recheck);
        let (mut born, _) = procfs::births(&root, again);
        let (more, missing) = procfs::births(&root, fresh);
        born.extend(more);
        b.recheck = missing;
        if born.is_empty() {
            return;
        }
        born.sort_unstable();
        for f in self.families.values_mut() {
            let mut new_in_tree: Vec<u32> = Vec::new();
            for &(pid, ppid) in &born {
                if f.tree.contains(&ppid) || new_in_tree.contains(&ppid) {
                    new_in_tree.push(pid);
                }
            }
            if !new_in_tree.is_empty() {
                f.dirty = true;
            }
        }
    }
}

/// What a descendant must show to join a family (see `Agent::consider_child`).
struct Joining {
    /// The family's channel address (a fork child's is its parent's).
    channel: u64,
    socket_hash: u64,
    /// The members' nonces: a fork child's `parent_nonce` is one of them.
    nonces: BTreeSet<u64>,
}
