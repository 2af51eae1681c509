//! A lean unary gRPC client straight on h2: one HTTP/2 connection per `Conn`, shared by many
//! concurrent clients (h2 multiplexes streams), no tower buffer or hyper dispatch in between.
//! The harness shares the machine with the server under test, so every microsecond of client
//! CPU per request is taken from the server it measures.

use bytes::{BufMut, Bytes, BytesMut};
use keel_proto::prost::Message;

/// A gRPC error as the server sent it: numeric code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: i32,
    pub message: String,
}

impl Status {
    pub fn transport(e: impl std::fmt::Display) -> Status {
        Status {
            code: 14,
            message: format!("transport: {e}"),
        }
    }

    pub fn code_name(&self) -> &'static str {
        const NAMES: [&str; 17] = [
            "OK",
            "Canceled",
            "Unknown",
            "InvalidArgument",
            "DeadlineExceeded",
            "NotFound",
            "AlreadyExists",
            "PermissionDenied",
            "ResourceExhausted",
            "FailedPrecondition",
            "Aborted",
            "OutOfRange",
            "Unimplemented",
            "Internal",
            "Unavailable",
            "DataLoss",
            "Unauthenticated",
        ];
        NAMES.get(self.code as usize).copied().unwrap_or("Unknown")
    }
}

#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    authority: String,
}

impl Conn {
    /// A connection with the harness's flow-control windows: 1 MiB a stream, 16 MiB in all.
    pub async fn connect(addr: &str) -> anyhow::Result<Conn> {
        Conn::connect_with_window(addr, 1 << 20, 16 << 20).await
    }

    /// A connection whose streams may each hold `stream_window` bytes the caller has not read,
    /// `conn_window` bytes in all.
    pub async fn connect_with_window(
        addr: &str,
        stream_window: u32,
        conn_window: u32,
    ) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(conn_window)
            .handshake::<_, Bytes>(tcp)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            authority: addr.to_string(),
        })
    }

    /// Starts a gRPC call on `path`: request headers sent, body stream open.
    async fn open(
        &self,
        path: &str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), Status> {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("valid request");
        let mut send = self.send.clone().ready().await.map_err(Status::transport)?;
        send.send_request(request, false).map_err(Status::transport)
    }

    /// One unary call: `path` like "/etcdserverpb.KV/Put".
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, Status> {
        let (response, mut stream) = self.open(path).await?;
        stream
            .send_data(frame(req), true)
            .map_err(Status::transport)?;
        let (parts, mut body) = response.await.map_err(Status::transport)?.into_parts();
        if let Some(st) = grpc_status(&parts.headers) {
            return Err(st); // trailers-only error response
        }
        let mut data = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(Status::transport)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await.map_err(Status::transport)?;
        if let Some(st) = trailers.as_ref().and_then(grpc_status) {
            return Err(st);
        }
        if data.len() < 5 {
            return Err(Status::transport("response without a message"));
        }
        Resp::decode(&data[5..]).map_err(Status::transport)
    }
}

/// A bidirectional gRPC stream (Watch, LeaseKeepAlive): framed messages both ways.
pub struct Bidi<Req, Resp> {
    send: h2::SendStream<Bytes>,
    response: Option<h2::client::ResponseFuture>,
    body: Option<h2::RecvStream>,
    buf: BytesMut,
    _types: std::marker::PhantomData<fn(Req) -> Resp>,
}

impl Conn {
    /// Opens a bidirectional stream on `path`, like "/etcdserverpb.Watch/Watch".
    pub async fn bidi<Req: Message, Resp: Message + Default>(
        &self,
        path: &str,
    ) -> Result<Bidi<Req, Resp>, Status> {
        let (response, stream) = self.open(path).await?;
        Ok(Bidi {
            send: stream,
            response: Some(response),
            body: None,
            buf: BytesMut::new(),
            _types: std::marker::PhantomData,
        })
    }
}

impl<Req: Message, Resp: Message + Default> Bidi<Req, Resp> {
    pub fn send(&mut self, m: &Req) -> Result<(), Status> {
        self.send
            .send_data(frame(m), false)
            .map_err(Status::transport)
    }

    /// Ends the sending side (a server-streaming call's one request is sent).
    pub fn close_send(&mut self) -> Result<(), Status> {
        self.send
            .send_data(Bytes::new(), true)
            .map_err(Status::transport)
    }

    /// The next message; Ok(None) when the server ends the stream cleanly.
    pub async fn recv(&mut self) -> Result<Option<Resp>, Status> {
        if let Some(resp) = self.response.take() {
            let (parts, body) = resp.await.map_err(Status::transport)?.into_parts();
            if let Some(st) = grpc_status(&parts.headers) {
                return Err(st);
            }
            self.body = Some(body);
        }
        let body = self.body.as_mut().expect("response headers were read");
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    let msg = self.buf.split_to(5 + len);
                    return Resp::decode(&msg[5..]).map(Some).map_err(Status::transport);
                }
            }
            match body.data().await {
                Some(chunk) => {
                    let chunk = chunk.map_err(Status::transport)?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                None => {
                    let trailers = body.trailers().await.map_err(Status::transport)?;
                    return match trailers.as_ref().and_then(grpc_status) {
                        Some(st) => Err(st),
                        None => Ok(None),
                    };
                }
            }
        }
    }
}

/// A gRPC message frame: uncompressed flag, big-endian length, the message.
fn frame<M: Message>(m: &M) -> Bytes {
    let len = m.encoded_len();
    let mut f = BytesMut::with_capacity(5 + len);
    f.put_u8(0);
    f.put_u32(len as u32);
    m.encode(&mut f).expect("buffer has room");
    f.freeze()
}

/// The gRPC status in headers or trailers, if it is an error.
fn grpc_status(h: &http::HeaderMap) -> Option<Status> {
    let code: i32 = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    if code == 0 {
        return None;
    }
    let message = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(Status { code, message })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(super::percent_decode("a%20b%3A"), "a b:");
        assert_eq!(super::percent_decode("100%"), "100%");
    }
}
