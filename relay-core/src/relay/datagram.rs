//! Datagrams of a UDP flow on a tunnel stream: `len:u16` (big-endian), then `len` bytes.
//!
//! A UDP flow rides a relayed stream like a TCP connection (header, status byte), so it works
//! over every transport and its setup is reliable; the framing keeps datagram boundaries. A
//! datagram never exceeds [`MAX_DATAGRAM`], the most a UDP/IPv4 packet carries, so the length
//! always fits.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest UDP payload (65 535 − 8 − 20).
pub(crate) const MAX_DATAGRAM: usize = 65_507;

/// Write one datagram and flush it (a datagram is sent whole or not at all).
///
/// # Errors
/// The stream failed, or `payload` is over [`MAX_DATAGRAM`].
pub(crate) async fn write_datagram<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() > MAX_DATAGRAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "datagram over 65507 bytes",
        ));
    }
    let len = u16::try_from(payload.len()).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(2 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// Read one datagram (allocated to its length, so an idle flow holds no buffer), or `None` at
/// a clean end of stream between datagrams.
///
/// Not cancel-safe: a cancelled read leaves the stream mid-frame.
///
/// # Errors
/// The stream failed or ended inside a frame, or a frame claims more than [`MAX_DATAGRAM`].
pub(crate) async fn read_datagram<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    let first = reader.read(&mut len[..1]).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut len[1..]).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_DATAGRAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("datagram frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_keep_their_boundaries_and_bad_frames_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        for payload in [&b""[..], b"x", &[7u8; MAX_DATAGRAM][..]] {
            write_datagram(&mut a, payload).await.unwrap();
        }
        assert!(
            write_datagram(&mut a, &[0u8; MAX_DATAGRAM + 1])
                .await
                .is_err()
        );
        drop(a);
        assert_eq!(read_datagram(&mut b).await.unwrap(), Some(vec![]));
        assert_eq!(read_datagram(&mut b).await.unwrap(), Some(b"x".to_vec()));
        assert_eq!(
            read_datagram(&mut b).await.unwrap(),
            Some(vec![7u8; MAX_DATAGRAM])
        );
        assert_eq!(read_datagram(&mut b).await.unwrap(), None);

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0xff, 0xff]).await.unwrap();
        assert!(read_datagram(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 5, 1, 2]).await.unwrap();
        drop(a);
        assert!(read_datagram(&mut b).await.is_err(), "truncated");
    }
}
