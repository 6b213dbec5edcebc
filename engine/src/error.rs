//! The engine's error type. Each variant says what happened and, where a person can act,
//! what to do. [`Error::exit_code`] maps errors onto the CLI contract (1 failed, 3 refused,
//! 4 blocked).
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an update cannot be applied live: the kind a program acts on (the reason text is for
/// people). Every refusal carries one, in errors and in `--json` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum RefusalKind {
    /// A global's size changed, or the new code needs state the running process lacks.
    DataLayout,
    /// The bundle was built for another executable.
    BuildIdMismatch,
    /// The live code differs from the executable the bundle was built against.
    CodeMismatch,
    /// The old function is too short for the jump and nothing can hold a trampoline.
    FunctionTooShort,
    /// A reference of the new code cannot be bound to the running process.
    UnsupportedReference,
    /// The new body breaks the register contract its unpatched callers rely on, and no thunk can fix it.
    RegisterContract,
    /// A symbol the new code needs is defined by no loaded library.
    MissingSymbol,
    /// Refused when the bundle was built (`build --record-refusal`); the recorded kind is unknown.
    Recorded,
}

impl RefusalKind {
    /// What to do about it, in one sentence.
    pub fn advice(self) -> &'static str {
        match self {
            RefusalKind::DataLayout | RefusalKind::RegisterContract | RefusalKind::FunctionTooShort | RefusalKind::UnsupportedReference | RefusalKind::Recorded => {
                "restart the process on the fixed executable (offline update)"
            }
            RefusalKind::BuildIdMismatch | RefusalKind::CodeMismatch => "build the bundle from the exact executable the process runs",
            RefusalKind::MissingSymbol => "restart the process so it loads the libraries the fix needs",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The change cannot be applied to a live process; an offline restart is needed.
    #[error("refused: {reason}")]
    Refused { kind: RefusalKind, reason: String, restart_required: bool },

    /// The bundle was built for another executable.
    #[error("refused: build id mismatch: the bundle was built for build id {expected}, but process {pid} runs {found}; build the bundle from the exact executable the process runs (livepatch build --old <that file>)")]
    BuildIdMismatch { pid: i32, expected: String, found: String },

    /// Old code stayed active until the timeout; the target was left unchanged.
    #[error("blocked: {0}")]
    Blocked(String),

    #[error("{path}: {msg}")]
    Elf { path: PathBuf, msg: String },

    #[error("bad bundle: {0}")]
    Bundle(String),

    #[error("process {pid}: {msg}")]
    Process { pid: i32, msg: String },

    #[error("ptrace {op} on thread {tid}: {errno}{advice}")]
    Ptrace { op: &'static str, tid: i32, errno: nix::errno::Errno, advice: &'static str },

    #[error("{context}: {source}")]
    Io { context: String, #[source] source: std::io::Error },

    /// The two builds run the same code: there is no update to make.
    #[error("nothing to patch: {0}")]
    NothingToPatch(String),

    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Exit code of the CLI contract.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused { .. } | Error::BuildIdMismatch { .. } => 3,
            Error::Blocked(_) => 4,
            _ => 1,
        }
    }

    /// Whether the outcome means the process should be restarted offline to get the fix.
    pub fn restart_required(&self) -> bool {
        match self {
            Error::Refused { restart_required, .. } => *restart_required,
            Error::Blocked(_) => true,
            _ => false,
        }
    }

    pub fn refused_kind(kind: RefusalKind, reason: impl Into<String>) -> Self {
        Error::Refused { kind, reason: reason.into(), restart_required: true }
    }

    /// The typed kind of a refusal (`None` for other errors).
    pub fn refusal_kind(&self) -> Option<RefusalKind> {
        match self {
            Error::Refused { kind, .. } => Some(*kind),
            Error::BuildIdMismatch { .. } => Some(RefusalKind::BuildIdMismatch),
            _ => None,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    pub fn ptrace(op: &'static str, tid: i32, errno: nix::errno::Errno) -> Self {
        let advice = match errno {
            nix::errno::Errno::EPERM => {
                " (permission denied: run as root or with CAP_SYS_PTRACE; in Kubernetes add SYS_PTRACE to the container's securityContext.capabilities and set hostPID: true; check that no other debugger is attached and that kernel.yama.ptrace_scope allows attaching)"
            }
            nix::errno::Errno::ESRCH => " (the thread exited or is not stopped)",
            _ => "",
        };
        Error::Ptrace { op, tid, errno, advice }
    }
}
