//! Pseudo-terminals for the device simulator: the simulator reads and writes the master side,
//! and the poller opens the slave side's path (`/dev/pts/N`) as it would a USB serial adapter.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use tokio::io::unix::AsyncFd;

/// A pseudo-terminal whose master side is registered with tokio.
#[derive(Debug)]
pub struct PseudoTerminal {
    master: AsyncFd<PtyMaster>,
    slave_path: PathBuf,
    /// Kept open so the master never sees a hangup while the poller closes and reopens the
    /// slave; never read, so it takes no bytes from the poller.
    _slave_keepalive: File,
}

impl PseudoTerminal {
    /// Opens a new pseudo-terminal in raw mode (no echo, no line editing, 8-bit clean). Must be
    /// called inside a tokio runtime.
    pub fn open() -> io::Result<Self> {
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let slave_path = PathBuf::from(ptsname_r(&master)?);
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OFlag::O_NOCTTY.bits())
            .open(&slave_path)
            .map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("opening {}: {err}", slave_path.display()),
                )
            })?;
        // Raw until the poller configures the line itself: echo would bounce our answers back.
        let mut termios = tcgetattr(&slave)?;
        cfmakeraw(&mut termios);
        tcsetattr(&slave, SetArg::TCSANOW, &termios)?;
        fcntl(&master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        // SAFETY: `PtyMaster` owns its descriptor, which stays open until the `PtyMaster` is
        // dropped with the `AsyncFd`, and `as_raw_fd` always returns that same descriptor.
        let master = unsafe { AsyncFd::register(master) }?;
        Ok(Self {
            master,
            slave_path,
            _slave_keepalive: slave,
        })
    }

    /// The path the other side opens.
    pub fn slave_path(&self) -> &std::path::Path {
        &self.slave_path
    }

    /// Reads what the other side wrote; waits until something arrives.
    pub async fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.master.readable().await?;
            match guard.try_io(|master| {
                let mut master: &PtyMaster = master.get_ref();
                master.read(buffer)
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` to the other side.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|master| {
                let mut master: &PtyMaster = master.get_ref();
                master.write(data)
            }) {
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the pseudo-terminal took no bytes",
                    ))
                }
                Ok(Ok(written)) => data = &data[written..],
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
