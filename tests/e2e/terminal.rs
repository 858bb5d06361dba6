//! An agent started from a terminal: `enforcer exec` run with a pseudo-terminal of the test's as its stdin, stdout and
//! stderr and controlling terminal (the operator's terminal, as a shell's job has it). What the operator types reaches
//! the agent (`Ctrl-C` as its SIGINT), what the agent writes reaches the operator whole, the operator's window size
//! and terminal modes are the agent's, and the operator's terminal is left as it was; what the agent hands out of its
//! terminal does not reach the operator's once the run has ended.

use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{self, Env};

/// The operator's terminal: a pty whose slave `enforcer exec` is started on, and a thread that keeps reading what
/// reaches its master (as a terminal emulator does), so `exec` never blocks writing to it.
struct Operator {
    master: Arc<OwnedFd>,
    slave: OwnedFd,
    seen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// A new pseudo-terminal (openpty(3), no name, modes or window size): (master, slave).
pub fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty(3) fills two descriptors; no name, termios or window size.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned only here.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

impl Operator {
    fn new() -> Operator {
        let (master, slave) = open_pty();
        let master = Arc::new(master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (master, seen, stop) = (master.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::SeqCst) {
                    let mut poll = libc::pollfd {
                        fd: master.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: poll(2) on one descriptor we hold, then read(2) into `buf` of the length given.
                    let n = unsafe {
                        if libc::poll(&mut poll, 1, 50) != 1 {
                            continue;
                        }
                        libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    let Ok(n) = usize::try_from(n) else { break };
                    if n == 0 {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        Operator {
            master,
            slave,
            seen,
            stop,
            reader: Some(reader),
        }
    }

    /// `exec` with this terminal as its stdin, stdout, stderr and controlling terminal, leading a session of its own
    /// (its process group is the terminal's foreground group, as a shell's foreground job is).
    fn attach(&self, exec: &mut Command) {
        exec.stdin(self.slave.try_clone().expect("dup"))
            .stdout(self.slave.try_clone().expect("dup"))
            .stderr(self.slave.try_clone().expect("dup"));
        // SAFETY: setsid(2) and ioctl(2) only.
        unsafe {
            exec.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Type `bytes` at the terminal.
    fn type_in(&self, bytes: &[u8]) {
        // SAFETY: write(2) from a slice of the length given, to the master we hold.
        let n = unsafe { libc::write(self.master.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(usize::try_from(n).ok(), Some(bytes.len()), "typing");
    }

    /// Everything the terminal showed so far.
    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Wait until the terminal has shown `text`.
    fn wait_for(&self, text: &str) {
        self.wait_for_since(0, text);
    }

    /// Wait until the terminal has shown `text` after the first `mark` bytes (a length of [`Operator::seen`]).
    fn wait_for_since(&self, mark: usize, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.seen().get(mark..).unwrap_or_default().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {text:?}: {:?}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the terminal showed once `exec` has exited and the reader has caught up (nothing new for 300 ms).
    fn settle(&self) -> String {
        let mut last = self.seen();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.seen();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    fn termios(&self) -> libc::termios {
        // SAFETY: an all-zero termios is a valid value of this plain C struct; tcgetattr(3) fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr on the slave we hold, into a local.
        assert_eq!(
            unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) },
            0
        );
        t
    }

    fn set_size(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a local.
        assert_eq!(
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) },
            0
        );
    }

    /// The terminal's device number (its slave's `st_rdev`).
    fn rdev(&self) -> u64 {
        // SAFETY: an all-zero stat is a valid value of this plain C struct; fstat(2) fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on the slave we hold, into a local.
        assert_eq!(unsafe { libc::fstat(self.slave.as_raw_fd(), &mut st) }, 0);
        st.st_rdev
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The termios fields a terminal's modes are made of, comparable.
fn modes(t: &libc::termios) -> (u32, u32, u32, u32, Vec<u8>, u32, u32) {
    // SAFETY: cfget*speed read the termios given.
    let (ispeed, ospeed) = unsafe { (libc::cfgetispeed(t), libc::cfgetospeed(t)) };
    (
        t.c_iflag,
        t.c_oflag,
        t.c_cflag,
        t.c_lflag,
        t.c_cc.to_vec(),
        ispeed,
        ospeed,
    )
}

/// `enforcer exec -- ARGS` on the operator's terminal, spawned.
fn spawn_on(env: &Env, operator: &Operator, args: &[&str]) -> Child {
    let mut exec = env.exec_command();
    exec.args(args);
    operator.attach(&mut exec);
    exec.spawn().expect("enforcer exec")
}

/// Wait for `child`, at most 30 s; its exit code.
fn wait(mut child: Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("enforcer exec did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process of the agent's user outside its run: it takes one descriptor over the abstract unix socket argv[1] and
/// says `received`; on a line on its stdin it reads from that descriptor (waiting up to 2 s) and writes to it, and
/// prints the descriptor's device number and what it read (or the errno) as JSON.
const KEEPER: &str = r#"
import errno, json, os, select, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
_, fds, _, _ = socket.recv_fds(conn, 16, 1)
fd = fds[0]
print("received", flush=True)
sys.stdin.readline()
out = {"rdev": os.fstat(fd).st_rdev}
def attempt(what, f):
    try:
        out[what] = f()
    except OSError as e:
        out[what] = errno.errorcode[e.errno]
def read():
    r, _, _ = select.select([fd], [], [], 2)
    return os.read(fd, 1024).decode(errors="replace") if r else "nothing"
attempt("read", read)
attempt("write", lambda: os.write(fd, b"x"))
print(json.dumps(out), flush=True)
"#;

/// The agent: say whether it holds descriptor 3, hand its stdin to the process listening on the abstract unix socket
/// argv[1], then exit.
const HAND_OUT: &str = r#"
import errno, os, socket, sys
try:
    print("fd 3 is device", os.fstat(3).st_rdev, flush=True)
except OSError as e:
    print("fd 3:", errno.errorcode[e.errno], flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0" + sys.argv[1])
socket.send_fds(s, [b"t"], [0])
s.close()
print("handed out", flush=True)
"#;

/// An agent run from a terminal can pass its terminal's descriptor over a unix socket to a process of its user
/// outside the run, which keeps it after the run has ended. Before, that was the operator's own terminal: the outside
/// process read what the operator typed after the run (at the operator's root shell) and could write to it. Now the
/// agent's terminal is a pty `exec` made for the run and relays: the descriptor is not the operator's terminal, and
/// once the run has ended it is hung up (reads give end of file, writes `EIO`). Nor does the agent inherit another
/// descriptor of the operator's terminal `exec` was started with (here as descriptor 3): before, it did.
pub fn agent_terminal_handed_out_is_dead_after_the_run(env: &mut Env) {
    env.need_daemon();
    let name = format!("enforcer-e2e-keeper-{}", std::process::id());
    let mut keeper = Command::new(harness::PYTHON);
    keeper
        .args(["-c", KEEPER, &name])
        .uid(env.agent_uid)
        .gid(env.agent_gid)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    harness::die_with_harness(&mut keeper);
    let mut keeper = keeper.spawn().expect("the keeper, as the agent's user");
    let mut lines = std::io::BufReader::new(keeper.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );

    let operator = Operator::new();
    let mut exec = env.exec_command();
    exec.args(["python3", "-c", HAND_OUT, &name]);
    operator.attach(&mut exec);
    // SAFETY: dup2(2) only: descriptor 3 is another descriptor of the operator's terminal (stdin), inherited.
    unsafe {
        exec.pre_exec(|| {
            if libc::dup2(0, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let code = wait(exec.spawn().expect("enforcer exec"));
    let shown = operator.settle();
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("fd 3: EBADF\r\n"), "{shown:?}");
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("received")
    );
    assert!(shown.contains("handed out"), "{shown:?}");

    // The run is over; the operator types at the shell they are back at.
    operator.type_in(b"typed-after-the-run\n");
    let mut go = keeper.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut go, b"\n").expect("go");
    let line = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = keeper.kill();
    let _ = keeper.wait();
    let result: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_ne!(
        result["rdev"].as_u64(),
        Some(operator.rdev()),
        "the agent handed out the operator's terminal: {result}"
    );
    assert_eq!(result["read"], "", "{result}");
    assert_eq!(result["write"], "EIO", "{result}");
}

/// `Ctrl-C` typed at the operator's terminal reaches the agent as its SIGINT, through the agent's pty: `exec` has the
/// operator's terminal in raw mode while the agent runs (no `ICANON`, no `ISIG`: the byte is relayed, not turned into
/// a signal for `exec`'s group), and the pty's line discipline signals the agent's foreground group. The run ends with
/// the status the agent's handler chose, and the operator's modes are back.
pub fn agent_ctrl_c_typed_at_the_terminal_reaches_the_agent(env: &mut Env) {
    env.need_daemon();
    let operator = Operator::new();
    let before = operator.termios();
    let exec = spawn_on(
        env,
        &operator,
        &[
            "sh",
            "-c",
            "trap 'echo trapped; exit 7' INT; echo ready; while :; do sleep 0.05; done",
        ],
    );
    operator.wait_for("ready");
    let during = operator.termios();
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ISIG | libc::ECHO),
        0,
        "the operator's terminal is not raw while the agent runs"
    );
    operator.type_in(b"\x03");
    let code = wait(exec);
    let shown = operator.settle();
    assert_eq!(code, Some(7), "{shown:?}");
    assert!(shown.contains("trapped"), "{shown:?}");
    assert_eq!(modes(&operator.termios()), modes(&before));
}

/// Output the agent writes just before it exits reaches the operator whole (`exec` reads the pty until no slave is
/// left), and the operator's terminal gets back its exact modes (set here to ones no default has) however the run
/// ends: the agent exiting, the agent killed by a signal, `exec` sent SIGTERM, the run killed by `exec` when the
/// agent ignored that SIGTERM for longer than `--stop-timeout`.
pub fn agent_output_arrives_whole_and_the_terminal_is_restored(env: &mut Env) {
    env.need_daemon();
    let operator = Operator::new();
    let mut modes_set = operator.termios();
    modes_set.c_lflag &= !libc::ECHOCTL;
    modes_set.c_cc[libc::VKILL] = 0x0b;
    modes_set.c_cc[libc::VWERASE] = 0x0e;
    // SAFETY: tcsetattr on the slave we hold, from a local.
    assert_eq!(
        unsafe { libc::tcsetattr(operator.slave.as_raw_fd(), libc::TCSANOW, &modes_set) },
        0
    );
    let before = modes(&operator.termios());

    // 300,000 bytes and a last line, written right before the agent exits.
    let exec = spawn_on(
        env,
        &operator,
        &[
            "python3",
            "-c",
            "import sys; sys.stdout.write('x' * 300000 + 'END\\n'); sys.stdout.flush()",
        ],
    );
    let code = wait(exec);
    let shown = operator.settle();
    assert_eq!(
        code,
        Some(0),
        "{}",
        &shown[shown.len().saturating_sub(500)..]
    );
    assert_eq!(shown.matches('x').count(), 300_000);
    assert!(
        shown.ends_with("xEND\r\n"),
        "{:?}",
        &shown[shown.len().saturating_sub(100)..]
    );
    assert_eq!(modes(&operator.termios()), before, "after an exit");

    // The agent killed by a signal: 128 + 9.
    let exec = spawn_on(env, &operator, &["sh", "-c", "echo dying; kill -9 $$"]);
    assert_eq!(wait(exec), Some(137), "{}", operator.settle());
    assert_eq!(
        modes(&operator.termios()),
        before,
        "after the agent was killed"
    );

    // `exec` sent SIGTERM: passed on to the agent, which ends with it (128 + 15).
    let mark = operator.seen().len();
    let exec = spawn_on(env, &operator, &["sh", "-c", "echo waiting; exec sleep 30"]);
    operator.wait_for_since(mark, "waiting");
    let pid = i32::try_from(exec.id()).expect("pid");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(wait(exec), Some(143), "{}", operator.settle());
    assert_eq!(modes(&operator.termios()), before, "after SIGTERM to exec");

    // The agent ignores SIGTERM: `exec` kills the run a second after passing it on (128 + 9), and says so once the
    // operator's modes are back (a line ending in "\r\n": the terminal's own output processing, not raw mode).
    let mark = operator.seen().len();
    let mut exec = env.exec_command_with(&["--stop-timeout", "1"]);
    exec.args([
        "sh",
        "-c",
        "trap '' TERM; echo ignoring; while :; do sleep 0.05; done",
    ]);
    operator.attach(&mut exec);
    let exec = exec.spawn().expect("enforcer exec");
    operator.wait_for_since(mark, "ignoring");
    let pid = i32::try_from(exec.id()).expect("pid");
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(wait(exec), Some(137), "{}", operator.settle());
    let shown = operator.settle();
    assert!(
        shown[mark..].ends_with(
            "enforcer exec: the run did not end within 1 s of SIGTERM (--stop-timeout): every process of it was \
             killed\r\n"
        ),
        "{:?}",
        &shown[mark..]
    );
    assert_eq!(
        modes(&operator.termios()),
        before,
        "after the run was killed"
    );
}

/// The operator's window size is the agent's from the start, and a change of it (SIGWINCH to `exec`) reaches the
/// agent as its own SIGWINCH with the new size.
pub fn agent_sees_the_operators_window_size_and_its_changes(env: &mut Env) {
    env.need_daemon();
    let operator = Operator::new();
    operator.set_size(37, 101);
    let exec = spawn_on(
        env,
        &operator,
        &[
            "sh",
            "-c",
            "trap 'echo resized $(stty size); exit 0' WINCH; echo size $(stty size); \
             while :; do sleep 0.05; done",
        ],
    );
    operator.wait_for("size 37 101");
    operator.set_size(50, 120);
    let code = wait(exec);
    let shown = operator.settle();
    assert_eq!(code, Some(0), "{shown:?}");
    assert!(shown.contains("resized 50 120"), "{shown:?}");
}

/// `Ctrl-Z` typed at the operator's terminal stops the agent (its pty's line discipline sends its group SIGTSTP);
/// `exec` then restores the operator's modes and stops its own process group as sudo does, and once continued,
/// continues the agent. Here `exec` leads a session no shell controls, so the kernel discards the SIGTSTP to `exec`
/// (an orphaned process group) and it continues the agent at once: the agent's SIGCONT trap runs, and `Ctrl-C` after
/// it still reaches the agent.
pub fn agent_ctrl_z_stops_the_agent_and_exec_continues_it(env: &mut Env) {
    env.need_daemon();
    let operator = Operator::new();
    let exec = spawn_on(env, &operator, &["bash", "-c", STOPPABLE]);
    operator.wait_for("ready-42");
    operator.type_in(b"\x1a");
    operator.wait_for("continued-42");
    // Raw again once the agent runs again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while operator.termios().c_lflag & libc::ICANON != 0 {
        assert!(
            Instant::now() < deadline,
            "the terminal was not made raw again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    operator.type_in(b"\x03");
    let code = wait(exec);
    let shown = operator.settle();
    assert_eq!(code, Some(9), "{shown:?}");
}

/// The agent of the `Ctrl-Z` test: a loop that says when it is continued and exits 9 on SIGINT. bash, not dash:
/// dash starts `sleep` with vfork(2), and a child stopped between vfork and exec keeps dash in vfork, unstoppable,
/// so the agent itself would never be seen stopped (nor would a shell's job be, run without `exec`).
const STOPPABLE: &str =
    "trap 'echo continued-$((6*7))' CONT; trap 'exit 9' INT; echo ready-$((6*7)); while :; do sleep 0.05; done";

/// A shell's job control, as much of it as the test needs: argv is a command, started in a process group of its own
/// in the background of this terminal (the shell leads the terminal's session); after a second the shell says
/// `foreground`, and hands the terminal to the job as bash's `fg` does to a job that runs (tcsetpgrp(3), no signal),
/// then exits with the job's code.
const BACKGROUND_JOB: &str = r#"
import os, signal, sys, time
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.execvp(sys.argv[1], sys.argv[1:])
os.setpgid(pid, pid)
time.sleep(1)
print("foreground", flush=True)
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
os.tcsetpgrp(0, pid)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

/// `enforcer exec … &` then `fg` at a shell: the job runs in the background until the shell hands it the terminal,
/// and bash's `fg` of a job that runs sends it no signal. Before, `exec` looked for the terminal only when continued
/// (SIGCONT), so it never took it: the terminal stayed cooked, what the operator typed went to the shell's line
/// discipline instead of the agent, and Ctrl-C reached `exec` (which ignores it) instead of the agent. Now `exec`
/// notices it has the terminal: raw mode, and typed input (here a line, then Ctrl-C) reaches the agent.
pub fn agent_started_in_the_background_gets_the_terminal_on_fg(env: &mut Env) {
    env.need_daemon();
    let operator = Operator::new();
    let mut argv = env.exec_argv_in(harness::PROFILE);
    for a in [
        "bash",
        "-c",
        "trap 'echo trapped; exit 6' INT; echo ready; read line; echo got-$line; while :; do sleep 0.05; done",
    ] {
        argv.push(a.into());
    }
    let mut shell = env.agent_command(Command::new("python3"));
    shell.arg("-c").arg(BACKGROUND_JOB).args(&argv);
    operator.attach(&mut shell);
    let shell = shell.spawn().expect("the shell");
    operator.wait_for("foreground");
    operator.wait_for("ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    while operator.termios().c_lflag & libc::ICANON != 0 {
        assert!(
            Instant::now() < deadline,
            "exec never took the terminal it was given: {:?}",
            operator.seen()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    operator.type_in(b"typed\r");
    operator.wait_for("got-typed");
    operator.type_in(b"\x03");
    let code = wait(shell);
    let shown = operator.settle();
    assert_eq!(code, Some(6), "{shown:?}");
    assert!(shown.contains("trapped"), "{shown:?}");
}
