//! A scripted foreign Hamlet peer: what a third-party implementation built
//! from the published protos would put on the wire, and nothing more. It is
//! made only of the generated stubs (`elsinore_federation_api::proto`), prost,
//! tonic and rustls (through `elsinore_certs` for the SPIFFE configs); it never
//! touches the gateway's owner/consumer code or the API crate's domain
//! conversions, so a bug shared by our encoder and our decoder cannot hide.
//! It knows nothing of Elsinore's metadata extensions: it sends no
//! `elsinore-window` header and no `elsinore-snapshot-size` header.
//!
//! Roles: as a consumer it dials an Elsinore owner ([`dial`], [`ConsumerV2`],
//! [`ConsumerV1`]); as an owner it terminates mTLS itself and serves the
//! generated `DiscoveryService` ([`serve_v2`], [`serve_v1`]), handing every
//! stream Elsinore opens to the test script, which answers step by step.
//! In v1alpha2 either side may be the gRPC client (the spec's owner behind
//! NAT), so both roles also go the other way: as an owner it dials an
//! Elsinore consumer and pushes ([`PushingOwnerV2`]), and as a consumer it
//! serves the stream an Elsinore owner dials ([`serve_consumer_v2`],
//! [`DialedConsumerV2`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use elsinore_certs::{Identity, TrustBundle};
use elsinore_federation_api::proto::federation::resourcediscovery::{
    v1alpha1 as rd1, v1alpha2 as rd2,
};
use elsinore_federation_api::proto::federation::types::{v1alpha1 as t1, v1alpha2 as t2};
use elsinore_federation_api::proto::google::rpc;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::server::{Connected, Router};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

/// The Hamlet resource type URLs, spelled out as a foreign peer would.
pub const TYPE_URL_V2: &str = "type.googleapis.com/federation.types.v1alpha2.FederatedService";
pub const TYPE_URL_V1: &str = "type.googleapis.com/federation.types.v1alpha1.FederatedService";

/// Upper bound on any single wait for the other side; far above what a
/// loopback exchange needs, so hitting it means the message never came.
pub const STEP: Duration = Duration::from_secs(15);

/// google.rpc.Code values used by the script.
pub const CODE_OK: i32 = 0;
pub const CODE_INVALID_ARGUMENT: i32 = 3;

// ---------------------------------------------------------------------------
// Consumer role: the foreign peer dials an Elsinore owner.
// ---------------------------------------------------------------------------

/// Opens an HTTP/2 channel to an Elsinore federation listener over mTLS,
/// presenting `identity` and accepting only a server that chains to
/// `elsinore` (the Elsinore mesh's bundle).
pub async fn dial(
    addr: SocketAddr,
    identity: &Identity,
    elsinore: &TrustBundle,
) -> anyhow::Result<Channel> {
    let config = elsinore_certs::client_config(identity, elsinore, None, &[b"h2"])?;
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            // SPIFFE authenticates by URI SAN; the name only fills SNI.
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(STEP)
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("dial Elsinore at {addr}"))?;
    Ok(channel)
}

/// A v1alpha2 stream opened by the foreign consumer.
pub struct ConsumerV2 {
    tx: mpsc::Sender<rd2::BidirectionalStream>,
    rx: Streaming<rd2::BidirectionalStream>,
    /// The owner's response headers.
    pub headers: MetadataMap,
}

impl ConsumerV2 {
    /// Opens the stream and sends the first request carrying `context`.
    /// No `elsinore-window` header: a foreign peer never heard of it.
    pub async fn open(channel: Channel, context: &str) -> anyhow::Result<ConsumerV2> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(rd2::BidirectionalStream {
            request: Some(rd2::StreamRequest {
                resource_url: TYPE_URL_V2.to_owned(),
                response_nonce: String::new(),
                status: None,
                context: context.to_owned(),
            }),
            response: None,
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
        let mut client = rd2::discovery_service_client::DiscoveryServiceClient::new(channel);
        let response = tokio::time::timeout(
            STEP,
            client.establish_stream(Request::new(ReceiverStream::new(rx))),
        )
        .await
        .context("EstablishStream (v1alpha2) timed out")??;
        let headers = response.metadata().clone();
        Ok(ConsumerV2 {
            tx,
            rx: response.into_inner(),
            headers,
        })
    }

    /// The next response, or an error if none arrives within [`STEP`].
    pub async fn next(&mut self) -> anyhow::Result<rd2::StreamResponse> {
        self.next_within(STEP)
            .await?
            .ok_or_else(|| anyhow!("no response within {STEP:?}"))
    }

    /// The next response if one arrives within `wait`. `Streaming::message`
    /// keeps its state in the stream, so giving up on it loses nothing.
    pub async fn next_within(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<Option<rd2::StreamResponse>> {
        next_response(&mut self.rx, wait).await
    }

    /// ACK: status OK with the response's nonce. The context is only sent
    /// on the first request, as the spec asks; later requests leave it empty.
    pub async fn ack(&self, nonce: &str) -> anyhow::Result<()> {
        self.reply(nonce, CODE_OK, "").await
    }

    /// NACK: a non-OK code and a message.
    pub async fn nack(&self, nonce: &str, message: &str) -> anyhow::Result<()> {
        self.reply(nonce, CODE_INVALID_ARGUMENT, message).await
    }

    async fn reply(&self, nonce: &str, code: i32, message: &str) -> anyhow::Result<()> {
        self.tx
            .send(rd2::BidirectionalStream {
                request: Some(status_request(nonce, code, message)),
                response: None,
            })
            .await
            .map_err(|_| anyhow!("request stream closed"))
    }
}

/// The owner's next response on a v1alpha2 stream, whichever side dialed
/// it, if one arrives within `wait`. `Streaming::message` keeps its state in
/// the stream, so giving up on it loses nothing.
async fn next_response(
    rx: &mut Streaming<rd2::BidirectionalStream>,
    wait: Duration,
) -> anyhow::Result<Option<rd2::StreamResponse>> {
    let Ok(message) = tokio::time::timeout(wait, rx.message()).await else {
        return Ok(None);
    };
    let message = message?.ok_or_else(|| anyhow!("the owner closed the stream"))?;
    match message {
        rd2::BidirectionalStream {
            response: Some(r),
            request: None,
        } => Ok(Some(r)),
        other => bail!("the owner sent a wrapper without exactly a response: {other:?}"),
    }
}

/// An ACK (`CODE_OK`) or NACK of `nonce`. The context is only sent on the
/// first request, as the spec asks; later requests leave it empty.
fn status_request(nonce: &str, code: i32, message: &str) -> rd2::StreamRequest {
    rd2::StreamRequest {
        resource_url: TYPE_URL_V2.to_owned(),
        response_nonce: nonce.to_owned(),
        status: Some(rpc::Status {
            code,
            message: message.to_owned(),
            details: vec![],
        }),
        context: String::new(),
    }
}

/// A v1alpha1 stream opened by the foreign consumer.
pub struct ConsumerV1 {
    tx: mpsc::Sender<rd1::StreamRequest>,
    rx: Streaming<rd1::StreamResponse>,
    pub headers: MetadataMap,
}

impl ConsumerV1 {
    pub async fn open(channel: Channel) -> anyhow::Result<ConsumerV1> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(rd1::StreamRequest {
            resource_url: TYPE_URL_V1.to_owned(),
            response_nonce: String::new(),
            status: None,
        })
        .await
        .map_err(|_| anyhow!("request channel closed"))?;
        let mut client = rd1::discovery_service_client::DiscoveryServiceClient::new(channel);
        let response = tokio::time::timeout(
            STEP,
            client.establish_stream(Request::new(ReceiverStream::new(rx))),
        )
        .await
        .context("EstablishStream (v1alpha1) timed out")??;
        let headers = response.metadata().clone();
        Ok(ConsumerV1 {
            tx,
            rx: response.into_inner(),
            headers,
        })
    }

    pub async fn next(&mut self) -> anyhow::Result<rd1::StreamResponse> {
        self.next_within(STEP)
            .await?
            .ok_or_else(|| anyhow!("no response within {STEP:?}"))
    }

    pub async fn next_within(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<Option<rd1::StreamResponse>> {
        let Ok(message) = tokio::time::timeout(wait, self.rx.message()).await else {
            return Ok(None);
        };
        Ok(Some(
            message?.ok_or_else(|| anyhow!("owner closed the stream"))?,
        ))
    }

    pub async fn ack(&self, nonce: &str) -> anyhow::Result<()> {
        self.tx
            .send(rd1::StreamRequest {
                resource_url: TYPE_URL_V1.to_owned(),
                response_nonce: nonce.to_owned(),
                status: Some(rpc::Status {
                    code: CODE_OK,
                    message: String::new(),
                    details: vec![],
                }),
            })
            .await
            .map_err(|_| anyhow!("request stream closed"))
    }
}

// ---------------------------------------------------------------------------
// Owner role: Elsinore dials the foreign peer.
// ---------------------------------------------------------------------------

/// A TLS connection the foreign server accepted. tonic needs `Connected`
/// on the IO type; the script does not look at connection info.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The foreign gRPC server; its tasks stop when it is dropped.
pub struct ForeignServer {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ForeignServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds 127.0.0.1:0, terminates mTLS with `identity` (clients must chain
/// to `elsinore`), and serves `router` on the accepted connections.
async fn spawn_server(
    identity: &Identity,
    elsinore: &TrustBundle,
    router: Router,
) -> anyhow::Result<ForeignServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(elsinore_certs::server_config(
        identity,
        std::slice::from_ref(elsinore),
        &[b"h2"],
    )?);
    let (conn_tx, conn_rx) = mpsc::channel::<Result<TlsConn, io::Error>>(8);
    let accept = tokio::spawn(async move {
        while let Ok((tcp, remote)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(STEP, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(TlsConn(tls))).await;
                    }
                    // Not fed to tonic: one bad handshake must not stop the server.
                    Ok(Err(error)) => eprintln!("foreign server: handshake from {remote}: {error}"),
                    Err(_) => eprintln!("foreign server: handshake from {remote} timed out"),
                }
            });
        }
    });
    let serve = tokio::spawn(async move {
        if let Err(error) = router
            .serve_with_incoming(ReceiverStream::new(conn_rx))
            .await
        {
            eprintln!("foreign server stopped: {error}");
        }
    });
    Ok(ForeignServer {
        addr,
        tasks: vec![accept, serve],
    })
}

/// One v1alpha2 stream Elsinore opened to the foreign owner.
pub struct OwnerStreamV2 {
    /// Elsinore's request headers.
    pub metadata: MetadataMap,
    inbound: Streaming<rd2::BidirectionalStream>,
    outbound: mpsc::Sender<Result<rd2::BidirectionalStream, Status>>,
}

impl OwnerStreamV2 {
    /// The next request Elsinore sends, within [`STEP`].
    pub async fn recv(&mut self) -> anyhow::Result<rd2::StreamRequest> {
        let message = tokio::time::timeout(STEP, self.inbound.message())
            .await
            .map_err(|_| anyhow!("no request from Elsinore within {STEP:?}"))??
            .ok_or_else(|| anyhow!("Elsinore closed the stream"))?;
        match message {
            rd2::BidirectionalStream {
                request: Some(r),
                response: None,
            } => Ok(r),
            other => bail!("Elsinore sent a wrapper without exactly a request: {other:?}"),
        }
    }

    pub async fn send(&self, response: rd2::StreamResponse) -> anyhow::Result<()> {
        self.outbound
            .send(Ok(rd2::BidirectionalStream {
                request: None,
                response: Some(response),
            }))
            .await
            .map_err(|_| anyhow!("response stream closed"))
    }
}

/// The scripted v1alpha2 owner service: every stream goes to the test.
struct ScriptedV2 {
    streams: mpsc::Sender<OwnerStreamV2>,
}

#[tonic::async_trait]
impl rd2::discovery_service_server::DiscoveryService for ScriptedV2 {
    type EstablishStreamStream = ReceiverStream<Result<rd2::BidirectionalStream, Status>>;

    async fn establish_stream(
        &self,
        request: Request<Streaming<rd2::BidirectionalStream>>,
    ) -> Result<Response<Self::EstablishStreamStream>, Status> {
        let (outbound, rx) = mpsc::channel(16);
        let stream = OwnerStreamV2 {
            metadata: request.metadata().clone(),
            inbound: request.into_inner(),
            outbound,
        };
        self.streams
            .send(stream)
            .await
            .map_err(|_| Status::unavailable("the script is gone"))?;
        // No snapshot-size header: a foreign owner never heard of it.
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts a foreign v1alpha2 owner; Elsinore's streams arrive on the receiver.
pub async fn serve_v2(
    identity: &Identity,
    elsinore: &TrustBundle,
) -> anyhow::Result<(ForeignServer, mpsc::Receiver<OwnerStreamV2>)> {
    let (streams, rx) = mpsc::channel(4);
    let router = Server::builder().add_service(
        rd2::discovery_service_server::DiscoveryServiceServer::new(ScriptedV2 { streams }),
    );
    Ok((spawn_server(identity, elsinore, router).await?, rx))
}

/// One v1alpha1 stream Elsinore opened to the foreign owner.
pub struct OwnerStreamV1 {
    pub metadata: MetadataMap,
    inbound: Streaming<rd1::StreamRequest>,
    outbound: mpsc::Sender<Result<rd1::StreamResponse, Status>>,
}

impl OwnerStreamV1 {
    pub async fn recv(&mut self) -> anyhow::Result<rd1::StreamRequest> {
        tokio::time::timeout(STEP, self.inbound.message())
            .await
            .map_err(|_| anyhow!("no request from Elsinore within {STEP:?}"))??
            .ok_or_else(|| anyhow!("Elsinore closed the stream"))
    }

    pub async fn send(&self, response: rd1::StreamResponse) -> anyhow::Result<()> {
        self.outbound
            .send(Ok(response))
            .await
            .map_err(|_| anyhow!("response stream closed"))
    }
}

struct ScriptedV1 {
    streams: mpsc::Sender<OwnerStreamV1>,
}

#[tonic::async_trait]
impl rd1::discovery_service_server::DiscoveryService for ScriptedV1 {
    type EstablishStreamStream = ReceiverStream<Result<rd1::StreamResponse, Status>>;

    async fn establish_stream(
        &self,
        request: Request<Streaming<rd1::StreamRequest>>,
    ) -> Result<Response<Self::EstablishStreamStream>, Status> {
        let (outbound, rx) = mpsc::channel(16);
        let stream = OwnerStreamV1 {
            metadata: request.metadata().clone(),
            inbound: request.into_inner(),
            outbound,
        };
        self.streams
            .send(stream)
            .await
            .map_err(|_| Status::unavailable("the script is gone"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts a foreign v1alpha1 owner; Elsinore's streams arrive on the receiver.
pub async fn serve_v1(
    identity: &Identity,
    elsinore: &TrustBundle,
) -> anyhow::Result<(ForeignServer, mpsc::Receiver<OwnerStreamV1>)> {
    let (streams, rx) = mpsc::channel(4);
    let router = Server::builder().add_service(
        rd1::discovery_service_server::DiscoveryServiceServer::new(ScriptedV1 { streams }),
    );
    Ok((spawn_server(identity, elsinore, router).await?, rx))
}

// ---------------------------------------------------------------------------
// v1alpha2, the owner dials: the gRPC client pushes responses.
// ---------------------------------------------------------------------------

/// A v1alpha2 stream the foreign owner opened to an Elsinore consumer: it
/// pushes responses in its request stream and reads the consumer's
/// requests (the first request, ACKs, NACKs) from the response stream.
pub struct PushingOwnerV2 {
    tx: mpsc::Sender<rd2::BidirectionalStream>,
    rx: Streaming<rd2::BidirectionalStream>,
    /// Elsinore's response headers.
    pub headers: MetadataMap,
}

impl PushingOwnerV2 {
    /// Opens the stream without sending anything: the consumer speaks
    /// first, with its initial request. No Elsinore headers are sent.
    pub async fn open(channel: Channel) -> anyhow::Result<PushingOwnerV2> {
        Self::open_with(channel, &[]).await
    }

    /// Like [`PushingOwnerV2::open`], with request metadata (to play an
    /// owner that knows one of Elsinore's extensions).
    pub async fn open_with(
        channel: Channel,
        metadata: &[(&'static str, &str)],
    ) -> anyhow::Result<PushingOwnerV2> {
        let (tx, rx) = mpsc::channel(16);
        let mut request = Request::new(ReceiverStream::new(rx));
        for (key, value) in metadata {
            request.metadata_mut().insert(*key, value.parse()?);
        }
        let mut client = rd2::discovery_service_client::DiscoveryServiceClient::new(channel);
        let response = tokio::time::timeout(STEP, client.establish_stream(request))
            .await
            .context("EstablishStream (v1alpha2, owner dialing) timed out")??;
        let headers = response.metadata().clone();
        Ok(PushingOwnerV2 {
            tx,
            rx: response.into_inner(),
            headers,
        })
    }

    /// The consumer's next request, within [`STEP`]. A status that ends
    /// the stream is returned as the error (a `tonic::Status` inside).
    pub async fn recv(&mut self) -> anyhow::Result<rd2::StreamRequest> {
        let message = tokio::time::timeout(STEP, self.rx.message())
            .await
            .map_err(|_| anyhow!("no request from the consumer within {STEP:?}"))??
            .ok_or_else(|| anyhow!("the consumer closed the stream"))?;
        match message {
            rd2::BidirectionalStream {
                request: Some(r),
                response: None,
            } => Ok(r),
            other => bail!("the consumer sent a wrapper without exactly a request: {other:?}"),
        }
    }

    /// Pushes one response.
    pub async fn send(&self, response: rd2::StreamResponse) -> anyhow::Result<()> {
        self.tx
            .send(rd2::BidirectionalStream {
                request: None,
                response: Some(response),
            })
            .await
            .map_err(|_| anyhow!("push stream closed"))
    }

    /// Sends a wrapper as it is (to play a peer that got the direction wrong).
    pub async fn send_raw(&self, message: rd2::BidirectionalStream) -> anyhow::Result<()> {
        self.tx
            .send(message)
            .await
            .map_err(|_| anyhow!("push stream closed"))
    }
}

/// One v1alpha2 stream an Elsinore owner dialed to the foreign consumer:
/// the script sends requests in the response stream and reads responses
/// from the request stream.
pub struct DialedConsumerV2 {
    /// Elsinore's request headers.
    pub metadata: MetadataMap,
    inbound: Streaming<rd2::BidirectionalStream>,
    outbound: mpsc::Sender<Result<rd2::BidirectionalStream, Status>>,
}

impl DialedConsumerV2 {
    /// Sends the first request (no nonce, no status) with `context`.
    pub async fn start(&self, context: &str) -> anyhow::Result<()> {
        self.request(rd2::StreamRequest {
            resource_url: TYPE_URL_V2.to_owned(),
            response_nonce: String::new(),
            status: None,
            context: context.to_owned(),
        })
        .await
    }

    /// The owner's next response, or an error if none arrives within [`STEP`].
    pub async fn next(&mut self) -> anyhow::Result<rd2::StreamResponse> {
        self.next_within(STEP)
            .await?
            .ok_or_else(|| anyhow!("no response within {STEP:?}"))
    }

    /// The next response if one arrives within `wait`.
    pub async fn next_within(
        &mut self,
        wait: Duration,
    ) -> anyhow::Result<Option<rd2::StreamResponse>> {
        next_response(&mut self.inbound, wait).await
    }

    pub async fn ack(&self, nonce: &str) -> anyhow::Result<()> {
        self.answer(nonce, CODE_OK, "").await
    }

    pub async fn nack(&self, nonce: &str, message: &str) -> anyhow::Result<()> {
        self.answer(nonce, CODE_INVALID_ARGUMENT, message).await
    }

    async fn answer(&self, nonce: &str, code: i32, message: &str) -> anyhow::Result<()> {
        self.request(status_request(nonce, code, message)).await
    }

    async fn request(&self, request: rd2::StreamRequest) -> anyhow::Result<()> {
        self.outbound
            .send(Ok(rd2::BidirectionalStream {
                request: Some(request),
                response: None,
            }))
            .await
            .map_err(|_| anyhow!("response stream closed"))
    }
}

/// The scripted v1alpha2 consumer service: every stream goes to the test.
struct ScriptedConsumerV2 {
    streams: mpsc::Sender<DialedConsumerV2>,
    /// An `elsinore-window` answer, to play a consumer that knows the
    /// extension; `None` = a foreign consumer.
    grant: Option<u32>,
}

#[tonic::async_trait]
impl rd2::discovery_service_server::DiscoveryService for ScriptedConsumerV2 {
    type EstablishStreamStream = ReceiverStream<Result<rd2::BidirectionalStream, Status>>;

    async fn establish_stream(
        &self,
        request: Request<Streaming<rd2::BidirectionalStream>>,
    ) -> Result<Response<Self::EstablishStreamStream>, Status> {
        let (outbound, rx) = mpsc::channel(16);
        let stream = DialedConsumerV2 {
            metadata: request.metadata().clone(),
            inbound: request.into_inner(),
            outbound,
        };
        self.streams
            .send(stream)
            .await
            .map_err(|_| Status::unavailable("the script is gone"))?;
        let mut response = Response::new(ReceiverStream::new(rx));
        if let Some(window) = self.grant {
            response
                .metadata_mut()
                .insert("elsinore-window", window.into());
        }
        Ok(response)
    }
}

/// Starts a foreign v1alpha2 consumer that Elsinore owners dial to push;
/// their streams arrive on the receiver.
pub async fn serve_consumer_v2(
    identity: &Identity,
    elsinore: &TrustBundle,
) -> anyhow::Result<(ForeignServer, mpsc::Receiver<DialedConsumerV2>)> {
    serve_consumer_v2_granting(identity, elsinore, None).await
}

/// Like [`serve_consumer_v2`], answering every stream's headers with
/// `elsinore-window: grant` when given (no header otherwise).
pub async fn serve_consumer_v2_granting(
    identity: &Identity,
    elsinore: &TrustBundle,
    grant: Option<u32>,
) -> anyhow::Result<(ForeignServer, mpsc::Receiver<DialedConsumerV2>)> {
    let (streams, rx) = mpsc::channel(4);
    let router =
        Server::builder().add_service(rd2::discovery_service_server::DiscoveryServiceServer::new(
            ScriptedConsumerV2 { streams, grant },
        ));
    Ok((spawn_server(identity, elsinore, router).await?, rx))
}

// ---------------------------------------------------------------------------
// Messages, encoded by hand from the proto structs.
// ---------------------------------------------------------------------------

/// The identity the foreign mesh's ingress presents (only carried, never dialed).
pub const FOREIGN_INGRESS_SAN: &str = "spiffe://foreign.test/ns/ingress/sa/gateway";

/// A well-formed v1alpha2 service exposed at 127.0.0.1:`port`.
pub fn service_v2(name: &str, fqdn: &str, port: u32) -> t2::FederatedService {
    t2::FederatedService {
        name: name.to_owned(),
        description: format!("{name}, scripted by the foreign peer"),
        tags: vec!["foreign".to_owned()],
        labels: Default::default(),
        fqdn: fqdn.to_owned(),
        endpoints: vec![t2::federated_service::Endpoint {
            address: "127.0.0.1".to_owned(),
            port,
            labels: vec![],
            description: String::new(),
        }],
        sans: vec![FOREIGN_INGRESS_SAN.to_owned()],
        instances: vec![t2::federated_service::Instance {
            id: "v1".to_owned(),
            protocol: "HTTP".to_owned(),
            metadata: [("SNI".to_owned(), fqdn.to_owned())].into_iter().collect(),
            endpoint_selector: vec![],
            description: String::new(),
        }],
    }
}

/// A v1alpha2 UPSERT of `service`, echoing `context`.
pub fn upsert_v2(
    nonce: &str,
    context: &str,
    service: &t2::FederatedService,
) -> rd2::StreamResponse {
    rd2::StreamResponse {
        nonce: nonce.to_owned(),
        resource_url: TYPE_URL_V2.to_owned(),
        resource_id: service.name.clone(),
        resource: Some(prost_types::Any {
            type_url: TYPE_URL_V2.to_owned(),
            value: service.encode_to_vec(),
        }),
        operation: rd2::stream_response::Operation::Upsert as i32,
        context: context.to_owned(),
    }
}

/// A v1alpha2 DELETE of `name`: the id says which; no resource is needed.
pub fn delete_v2(nonce: &str, context: &str, name: &str) -> rd2::StreamResponse {
    rd2::StreamResponse {
        nonce: nonce.to_owned(),
        resource_url: TYPE_URL_V2.to_owned(),
        resource_id: name.to_owned(),
        resource: None,
        operation: rd2::stream_response::Operation::Delete as i32,
        context: context.to_owned(),
    }
}

/// A well-formed v1alpha1 service exposed at 127.0.0.1:`port`.
pub fn service_v1(name: &str, fqdn: &str, port: u32) -> t1::FederatedService {
    t1::FederatedService {
        name: name.to_owned(),
        description: format!("{name}, scripted by the foreign peer"),
        tags: vec!["foreign".to_owned()],
        labels: Default::default(),
        fqdn: fqdn.to_owned(),
        id: name.to_owned(),
        san: FOREIGN_INGRESS_SAN.to_owned(),
        protocols: vec!["HTTP".to_owned()],
        endpoints: vec![t1::federated_service::Endpoint {
            address: "127.0.0.1".to_owned(),
            port,
        }],
    }
}

/// A v1alpha1 response carrying `service` with `operation`.
pub fn response_v1(
    nonce: &str,
    operation: rd1::stream_response::Operation,
    service: &t1::FederatedService,
) -> rd1::StreamResponse {
    rd1::StreamResponse {
        nonce: nonce.to_owned(),
        resource_url: TYPE_URL_V1.to_owned(),
        resource: Some(prost_types::Any {
            type_url: TYPE_URL_V1.to_owned(),
            value: service.encode_to_vec(),
        }),
        operation: operation as i32,
    }
}

/// A v1alpha1 DELETE: v1alpha1 has no resource id, so the name travels in
/// an otherwise empty resource.
pub fn delete_v1(nonce: &str, name: &str) -> rd1::StreamResponse {
    let stub = t1::FederatedService {
        name: name.to_owned(),
        ..Default::default()
    };
    response_v1(nonce, rd1::stream_response::Operation::Delete, &stub)
}
