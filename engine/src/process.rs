//! The target process as the OS shows it: `/proc/PID/maps`, memory through `/proc/PID/mem`,
//! threads, the running executable and its load bias. [`MemoryReader`] is the seam that lets
//! unwinding and planning run on captured memory without ptrace.
use crate::elf::ElfFile;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Read memory of some address space (a live process, or a captured snapshot in tests).
pub trait MemoryReader {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()>;

    fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }
}

/// Captured memory: (address, bytes) pieces.
#[derive(Debug, Default, Clone)]
pub struct Snapshot(pub Vec<(u64, Vec<u8>)>);

impl MemoryReader for Snapshot {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        for (a, bytes) in &self.0 {
            if addr >= *a {
                let off = (addr - a) as usize;
                if let Some(src) = bytes.get(off..off + buf.len()) {
                    buf.copy_from_slice(src);
                    return Ok(());
                }
            }
        }
        Err(Error::Other(format!("address {addr:#x} is not in the snapshot")))
    }
}

/// `/proc/PID/mem`, opened once. Writes go through the kernel's forced access, so read-only
/// code pages are written without ever making them writable in the target.
pub struct ProcMem {
    pid: i32,
    file: File,
}

impl ProcMem {
    /// The process whose memory this is.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Another handle on the same memory (a duplicated descriptor, no new open).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(ProcMem { pid: self.pid, file: self.file.try_clone().map_err(|e| Error::io("cannot duplicate the memory descriptor", e))? })
    }

    pub fn open(pid: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/mem");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|e| proc_err(pid, "open memory", e))?;
        Ok(ProcMem { pid, file })
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, addr).map_err(|e| Error::Process { pid: self.pid, msg: format!("cannot write {} bytes at {addr:#x}: {e}", data.len()) })
    }
}

impl MemoryReader for ProcMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, addr).map_err(|e| Error::Process { pid: self.pid, msg: format!("cannot read {} bytes at {addr:#x}: {e}", buf.len()) })
    }
}

pub fn proc_err(pid: i32, what: &str, e: std::io::Error) -> Error {
    let advice = match e.kind() {
        std::io::ErrorKind::NotFound => " (no such process: it exited?)",
        std::io::ErrorKind::PermissionDenied => {
            " (permission denied: run as root or with CAP_SYS_PTRACE; in Kubernetes add SYS_PTRACE to the container's capabilities and hostPID: true)"
        }
        _ => "",
    };
    Error::Process { pid, msg: format!("cannot {what}: {e}{advice}") }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

impl Mapping {
    pub fn contains(&self, a: u64) -> bool {
        a >= self.start && a < self.end
    }
    pub fn is_exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
}

pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let inode = it.next()?.parse().ok()?;
            let path = it.next().unwrap_or("").trim_start().to_string();
            let (a, b) = range.split_once('-')?;
            Some(Mapping { start: u64::from_str_radix(a, 16).ok()?, end: u64::from_str_radix(b, 16).ok()?, perms, offset, inode, path })
        })
        .collect()
}

/// A process we are about to work on.
#[derive(Debug)]
pub struct Process {
    pub pid: i32,
    /// Start time in clock ticks since boot (guards against PID reuse).
    pub start_time: u64,
}

impl Process {
    pub fn open(pid: i32) -> Result<Self> {
        if pid <= 0 {
            return Err(Error::Other(format!("{pid} is not a process id")));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| proc_err(pid, "read its status", e))?;
        let st = parse_stat(&stat).ok_or_else(|| Error::Process { pid, msg: "unreadable /proc stat".into() })?;
        if st.state == 'Z' || st.state == 'X' {
            return Err(Error::Process { pid, msg: "is a zombie (it exited and was not reaped); nothing to patch".into() });
        }
        if st.flags & 0x0020_0000 != 0 {
            // PF_KTHREAD
            return Err(Error::Process { pid, msg: "is a kernel thread; only user processes can be patched".into() });
        }
        Ok(Process { pid, start_time: st.start_time })
    }

    /// Fails when the PID now names another process than the one opened.
    pub fn check_same(&self) -> Result<()> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).map_err(|e| proc_err(self.pid, "read its status", e))?;
        match parse_stat(&stat) {
            Some(st) if st.start_time == self.start_time && st.state != 'Z' => Ok(()),
            _ => Err(Error::Process { pid: self.pid, msg: "exited during the operation".into() }),
        }
    }

    pub fn maps(&self) -> Result<Vec<Mapping>> {
        let t = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).map_err(|e| proc_err(self.pid, "read its memory map", e))?;
        Ok(parse_maps(&t))
    }

    pub fn threads(&self) -> Result<Vec<i32>> {
        let rd = std::fs::read_dir(format!("/proc/{}/task", self.pid)).map_err(|e| proc_err(self.pid, "list its threads", e))?;
        let mut v: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        v.sort();
        Ok(v)
    }

    pub fn thread_name(&self, tid: i32) -> String {
        std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid)).map(|s| s.trim().to_string()).unwrap_or_default()
    }

    pub fn exe_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/exe", self.pid))
    }

    pub fn exe(&self) -> Result<ElfFile> {
        ElfFile::open(&self.exe_path()).map_err(|e| match e {
            Error::Elf { msg, .. } => Error::Process { pid: self.pid, msg: format!("cannot read its executable: {msg}") },
            e => e,
        })
    }

    /// Where the executable is loaded: the load bias (AVMA = SVMA + bias).
    pub fn exe_bias(&self, exe: &ElfFile, maps: &[Mapping]) -> Result<u64> {
        if !exe.pie {
            return Ok(0);
        }
        let meta = std::fs::metadata(self.exe_path()).map_err(|e| proc_err(self.pid, "stat its executable", e))?;
        use std::os::unix::fs::MetadataExt;
        let ino = meta.ino();
        let first = exe.first_page();
        let m = maps
            .iter()
            .filter(|m| m.inode == ino && m.offset == 0)
            .min_by_key(|m| m.start)
            .ok_or_else(|| Error::Process { pid: self.pid, msg: "cannot find its executable in /proc/PID/maps".into() })?;
        m.start.checked_sub(first).ok_or_else(|| Error::Process { pid: self.pid, msg: "executable mapped below its first segment".into() })
    }
}

pub struct Stat {
    pub state: char,
    pub flags: u64,
    pub start_time: u64,
}

/// Parse `/proc/PID/stat` (the command name may contain spaces and parentheses).
pub fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name start at field 3 (state).
    Some(Stat { state: f.first()?.chars().next()?, flags: f.get(6)?.parse().ok()?, start_time: f.get(19)?.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse() {
        let t = "55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234 /usr/bin/a b\n7ffd1000-7ffd2000 rw-p 00000000 00:00 0 \n7f00-7f10 r-xs 00000000 00:01 99 /memfd:livepatch:lp-1 (deleted)\n";
        let m = parse_maps(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, "/usr/bin/a b");
        assert_eq!(m[0].inode, 1234);
        assert_eq!(m[1].path, "");
        assert!(m[2].is_exec());
        assert_eq!(m[2].path, "/memfd:livepatch:lp-1 (deleted)");
    }

    #[test]
    fn stat_parse_with_odd_name() {
        let s = "42 (a) b (c)) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1 2 3";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.flags, 4194560);
        assert_eq!(st.start_time, 12345);
    }

    #[test]
    fn snapshot_reads() {
        let s = Snapshot(vec![(0x1000, vec![1, 2, 3, 4, 5, 6, 7, 8, 9])]);
        assert_eq!(s.read_u64(0x1001).unwrap(), u64::from_le_bytes([2, 3, 4, 5, 6, 7, 8, 9]));
        assert!(s.read_u64(0x1002).is_err());
    }
}

/// One operation at a time per target process (across livepatch processes on the host).
pub struct Lock {
    _file: File,
}

impl Lock {
    pub fn take(proc: &Process) -> Result<Lock> {
        let dir = std::path::Path::new("/run/livepatch");
        let dir = if std::fs::create_dir_all(dir).is_ok() { dir.to_path_buf() } else { std::env::temp_dir() };
        let path = dir.join(format!("{}-{}.lock", proc.pid, proc.start_time));
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| Error::io(format!("cannot create lock {}", path.display()), e))?;
        // An exclusive flock on Linux (waits for the holder); released when the file closes.
        file.lock().map_err(|e| Error::io(format!("cannot lock {}", path.display()), e))?;
        Ok(Lock { _file: file })
    }
}
