//! A scripted foreign Hamlet owner (built on [`crate::foreign`]) that
//! advertises services
//! whose data-plane endpoint is something real the test runs: an Elsinore
//! ingress, or an Envoy. It lets a test choose exactly what the catalog
//! says (endpoint, SNI, `sans`) independently of who answers there, and
//! cut the federation stream while the data plane keeps running.

use std::net::SocketAddr;

use elsinore_certs::{Identity, TrustBundle};
use elsinore_federation_api::proto::federation::types::v1alpha2 as t2;
use tokio::sync::mpsc;

use crate::MeshFixture;
use crate::foreign::{ForeignServer, OwnerStreamV2, STEP, serve_v2, upsert_v2};

/// What the scripted owner says about one service.
pub struct Advertised<'a> {
    pub name: &'a str,
    pub fqdn: &'a str,
    /// Where consumers' egress must dial.
    pub endpoint: SocketAddr,
    /// The instance's `SNI` metadata (what the endpoint routes on).
    pub sni: &'a str,
    /// The SPIFFE IDs the endpoint's certificate may carry.
    pub sans: Vec<String>,
    /// The instance's `PORT` metadata: the port apps call on the VIP.
    pub port: u16,
    /// The instance protocol, e.g. `HTTP`, `TCP`.
    pub protocol: &'a str,
}

impl Advertised<'_> {
    pub fn to_wire(&self) -> t2::FederatedService {
        t2::FederatedService {
            name: self.name.to_owned(),
            description: format!("{}, advertised by a scripted owner", self.name),
            tags: vec![],
            labels: Default::default(),
            fqdn: self.fqdn.to_owned(),
            endpoints: vec![t2::federated_service::Endpoint {
                address: self.endpoint.ip().to_string(),
                port: u32::from(self.endpoint.port()),
                labels: vec![],
                description: String::new(),
            }],
            sans: self.sans.clone(),
            instances: vec![t2::federated_service::Instance {
                id: "v1".to_owned(),
                protocol: self.protocol.to_owned(),
                metadata: [
                    ("SNI".to_owned(), self.sni.to_owned()),
                    ("PORT".to_owned(), self.port.to_string()),
                ]
                .into_iter()
                .collect(),
                endpoint_selector: vec![],
                description: String::new(),
            }],
        }
    }
}

/// A running scripted owner and the one stream Elsinore opened to it.
pub struct ScriptedOwner {
    pub server: ForeignServer,
    streams: mpsc::Receiver<OwnerStreamV2>,
    stream: Option<(OwnerStreamV2, String)>,
    nonce: u64,
}

impl ScriptedOwner {
    /// Serves the Hamlet API (v1alpha2) as a workload of `owner`'s trust
    /// domain (`spiffe://<td>/ns/hamlet/sa/scripted-owner`, minted by its
    /// CA), accepting consumers that chain to `consumer`.
    pub async fn start(owner: &MeshFixture, consumer: &TrustBundle) -> ScriptedOwner {
        let id =
            MeshFixture::spiffe_id(owner.trust_domain.as_str(), "/ns/hamlet/sa/scripted-owner");
        let issued = owner.issue(&id);
        let identity = Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())
            .expect("parse the scripted owner's identity");
        let (server, streams) = serve_v2(&identity, consumer)
            .await
            .expect("start the scripted owner");
        ScriptedOwner {
            server,
            streams,
            stream: None,
            nonce: 0,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Waits for Elsinore's stream and its first request.
    pub async fn accept(&mut self) {
        let mut stream = tokio::time::timeout(STEP, self.streams.recv())
            .await
            .expect("Elsinore never opened a stream to the scripted owner")
            .expect("the scripted owner's server stopped");
        let first = stream.recv().await.expect("Elsinore's first request");
        assert!(first.response_nonce.is_empty(), "{first:?}");
        self.stream = Some((stream, first.context));
    }

    /// Sends each service as an UPSERT, one at a time, and checks that
    /// Elsinore ACKs it.
    pub async fn publish(&mut self, services: &[Advertised<'_>]) {
        let (stream, context) = self.stream.as_mut().expect("accept() before publish()");
        for service in services {
            self.nonce += 1;
            let nonce = format!("s-{}", self.nonce);
            stream
                .send(upsert_v2(&nonce, context, &service.to_wire()))
                .await
                .expect("send an UPSERT");
            let reply = stream.recv().await.expect("Elsinore's ACK");
            assert_eq!(reply.response_nonce, nonce, "{reply:?}");
            assert!(
                reply.status.as_ref().is_none_or(|s| s.code == 0),
                "Elsinore NACKed {}: {reply:?}",
                service.name
            );
        }
    }

    /// Ends the federation stream and stops serving: Elsinore loses its
    /// source of truth while whatever answers on the advertised endpoints
    /// keeps running.
    pub fn cut(self) {
        drop(self.stream);
        drop(self.streams);
        drop(self.server);
    }
}
