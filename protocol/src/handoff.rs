//! The arena's file descriptor, handed to a client with the answer to its
//! `Hello` (`SCM_RIGHTS` on the Unix socket), so that a client maps the
//! arena without resolving its path: containers mount the arena's
//! directory at different paths, or not at all (docs/protocol.md,
//! "The arena's descriptor").
//!
//! The descriptor rides on the **first byte of the `Hello` answer's
//! frame** (the first byte of its length prefix): the sidecar sends that
//! whole frame with one `sendmsg` carrying one `SCM_RIGHTS` message of one
//! descriptor, opened `O_RDONLY`. The bytes of the stream are unchanged:
//! a client that reads with `read()` gets the same frame, and the kernel
//! closes the descriptor it did not take. A client that wants it reads the
//! `Hello` answer's frame with `recvmsg` ([`read_frame_with_fds`]); on
//! Linux the descriptor comes with the call that reads the first byte of
//! that frame.
//!
//! Safe wrappers over rustix's `sendmsg`/`recvmsg`; every descriptor
//! received is an [`OwnedFd`] (closed when dropped, on every path, errors
//! included), received with `MSG_CMSG_CLOEXEC` (a worker's children never
//! inherit it).

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Most descriptors one `recvmsg` of a frame accepts: the sidecar sends
/// one; room for a few more lets a client see (and close) a wrong number
/// rather than have the kernel cut the control message (`MSG_CTRUNC`).
pub const MAX_FDS: usize = 4;

/// Why a frame with descriptors could not be received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandoffError {
    /// The socket failed (a timeout is `WouldBlock` or `TimedOut`).
    #[error("receive: {0}")]
    Io(#[from] io::Error),
    /// The connection closed before the frame was whole.
    #[error("the connection closed in the middle of a frame")]
    Closed,
    /// The frame's length prefix is over the limit; the body is not read.
    #[error("answer of {bytes} bytes is over the maximum of {max} bytes")]
    FrameTooLarge {
        /// The length prefix.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The kernel cut the control message (`MSG_CTRUNC`): more descriptors
    /// came than [`MAX_FDS`] (the ones that did not fit were closed by the
    /// kernel, the others are closed here).
    #[error("the control message was truncated (MSG_CTRUNC): more than {MAX_FDS} descriptors came with the frame")]
    ControlTruncated,
}

/// A frame's body and the descriptors that came with its bytes.
#[derive(Debug)]
pub struct Received {
    /// The frame's body (without the length prefix).
    pub body: Vec<u8>,
    /// The descriptors (`SCM_RIGHTS`) that came with the frame, in order;
    /// each is closed when dropped.
    pub fds: Vec<OwnedFd>,
}

/// Writes one frame (4-byte big-endian length, then `body`), the first
/// byte of it carrying `fd` as `SCM_RIGHTS`.
///
/// # Errors
/// The socket's I/O error; `InvalidInput` if `body` is over 4 GiB.
pub fn write_frame_with_fd(stream: &UnixStream, body: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let n = u32::try_from(body.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&n.to_be_bytes());
    frame.extend_from_slice(body);
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptor in the control buffer"));
    }
    let sent = loop {
        match sendmsg(stream, &[IoSlice::new(&frame)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if sent == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    // The descriptor went with the first byte; the rest (if the socket
    // took only part) goes as plain bytes.
    let mut s = stream;
    s.write_all(&frame[sent..])?;
    s.flush()
}

/// Reads one frame with `recvmsg`, keeping every descriptor that came with
/// its bytes. Reads exactly the frame's bytes, never past it.
///
/// # Errors
/// [`HandoffError`]; the descriptors received so far are closed.
pub fn read_frame_with_fds(stream: &UnixStream, max: usize) -> Result<Received, HandoffError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    receive_exact(stream, &mut len, &mut fds)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > max {
        return Err(HandoffError::FrameTooLarge { bytes: n, max });
    }
    let mut body = vec![0u8; n];
    receive_exact(stream, &mut body, &mut fds)?;
    Ok(Received { body, fds })
}

fn receive_exact(stream: &UnixStream, mut buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), HandoffError> {
    while !buf.is_empty() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = match recvmsg(
            stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(HandoffError::Io(e.into())),
        };
        // Take what came before looking at the flags: whatever happens
        // next, these are owned and closed on drop.
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(HandoffError::ControlTruncated);
        }
        if got.bytes == 0 {
            return Err(HandoffError::Closed);
        }
        buf = &mut buf[got.bytes..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    #[test]
    fn a_frame_with_a_descriptor_reads_as_a_plain_frame_too() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        write_frame_with_fd(&a, b"hello", file.as_fd()).unwrap();
        let mut bytes = [0u8; 9];
        b.read_exact(&mut bytes).unwrap();
        assert_eq!(&bytes, b"\0\0\0\x05hello");
    }

    #[test]
    fn the_descriptor_comes_with_its_frame_and_nothing_past_it_is_read() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        write_frame_with_fd(&a, b"hello", file.as_fd()).unwrap();
        crate::write_frame(&mut &a, b"next").unwrap();
        let got = read_frame_with_fds(&b, 1 << 20).unwrap();
        assert_eq!(got.body, b"hello");
        assert_eq!(got.fds.len(), 1);
        let got = read_frame_with_fds(&b, 1 << 20).unwrap();
        assert_eq!(got.body, b"next");
        assert!(got.fds.is_empty());
    }

    #[test]
    fn too_many_descriptors_are_an_error_not_a_leak() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let many: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 16).map(|_| file.as_fd()).collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 16))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&many)));
        sendmsg(&a, &[IoSlice::new(b"\0\0\0\x01x")], &mut control, SendFlags::empty()).unwrap();
        match read_frame_with_fds(&b, 1 << 20) {
            Err(HandoffError::ControlTruncated) => {}
            other => panic!("expected ControlTruncated, got {other:?}"),
        }
    }
}
