//! Never the last file descriptor (issue 15, item 1): under a real
//! open-file limit, a catalog with more TCP imports than descriptors gets
//! VIP listeners only within the budget derived from the limit; the rest
//! are reported in `/catalog` and the metrics, the admin endpoint keeps
//! answering, and apps still connect to the imports that have listeners.
//!
//! The limit is lowered on this test process itself with `prlimit` (util-
//! linux), which is why this file holds a single test: nextest and `cargo
//! test` both give it a process of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::Command;

use elsinore_gateway::config::Config;
use elsinore_gateway::runtime::{Gateway, StartOptions};
use elsinore_tests::dataplane::Backend;
use elsinore_tests::{ConfigSpec, ExportSpec, MeshFixture, WAIT, run_test, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: u64 = 512;
const IMPORTS: usize = 600;

async fn admin_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_listeners_leave_descriptors_for_everything_else() {
    let pid = std::process::id().to_string();
    let limit = format!("--nofile={LIMIT}:{LIMIT}");
    let status = Command::new("prlimit")
        .args(["--pid", &pid, &limit])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(
        status.success(),
        "prlimit {limit} on this test process failed"
    );
    run_test(async {
        let a = MeshFixture::data_plane("mesh-a").await;
        let b = MeshFixture::new("mesh-b").await;
        let echo = Backend::tcp_echo("echo").await;
        let exports: Vec<ExportSpec> = (0..IMPORTS)
            .map(|i| {
                ExportSpec::new(&format!("t{i:03}"), &["mesh-b"])
                    .protocol("TCP")
                    .port(7000)
                    .backend(&echo.host_port())
            })
            .collect();
        let _owner = a.start(&ConfigSpec::new().peer(b.peer()).with_exports(exports)).await;
        // A /22 of loopback: room for every import's VIP, so only the
        // descriptor budget can leave imports out.
        let r1: u8 = 100 + u8::try_from(std::process::id() % 150).unwrap_or(0);
        let text = format!(
            "mesh: {{ name: mesh-b, trustDomain: {td} }}\n\
             identity: {{ certificate: {cert:?}, privateKey: {key:?} }}\n\
             listeners: {{ federation: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", ingress: \"off\", egress: \"127.0.0.1:0\", dns: \"127.0.0.1:0\" }}\n\
             peers:\n  - {{ name: mesh-a, trustDomain: {atd}, trustBundle: {abundle:?}, federation: {afed:?} }}\n\
             proxy: {{ vipRange: \"127.{r1}.4.0/22\" }}\n",
            td = b.trust_domain,
            cert = b.cert.display().to_string(),
            key = b.key.display().to_string(),
            atd = a.trust_domain,
            abundle = a.ca_pem.display().to_string(),
            afed = a.federation_addr.to_string(),
        );
        let config = Config::from_yaml_str(&text, &b.dir).expect("consumer config");
        let gateway = Gateway::start(config, StartOptions::default())
            .await
            .expect("consumer starts");
        let admin = gateway.admin_addr;
        // Soft limit 512 minus the minimum reserve of 256.
        let budget = 256;
        let catalog: Value = wait_for("the imports beyond the budget reported", WAIT, || async {
            let body = admin_get(admin, "/catalog").await?;
            let doc: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let unbound = doc["egress"]["unbound"].as_array().map_or(0, Vec::len);
            if unbound == IMPORTS - budget {
                Ok(doc)
            } else {
                Err(format!("{unbound} unbound, listeners {}", doc["egress"]["listeners"]))
            }
        })
        .await;
        assert_eq!(catalog["egress"]["listeners"], budget);
        assert_eq!(catalog["egress"]["listenerBudget"], budget);
        let unbound = catalog["egress"]["unbound"].as_array().unwrap();
        assert!(unbound.iter().all(|u| u["reason"] == "budget"), "{unbound:?}");
        assert_eq!(unbound[0]["import"], format!("t{budget:03}.mesh-a.global"));
        let metrics = admin_get(admin, "/metrics").await.expect("metrics answer");
        assert!(
            metrics.contains(&format!(
                "elsinore_egress_unbound_listeners{{reason=\"budget\"}} {}\n",
                IMPORTS - budget
            )),
            "{metrics}"
        );
        // An import within the budget carries traffic, several connections
        // at once: the reserve is there for them. (Every connection costs
        // six descriptors here, as the owner, its backend and the app live
        // in this process too.)
        let table = gateway.shared.vips.borrow().clone();
        let entry = table.lookup_name("t000.mesh-a.global").expect("t000 imported");
        let vip = SocketAddr::from((entry.vip, entry.port));
        let mut apps = Vec::new();
        for i in 0..10u8 {
            apps.push(tokio::spawn(async move {
                let mut app = TcpStream::connect(vip).await.map_err(|e| e.to_string())?;
                app.write_all(&[i; 100]).await.map_err(|e| e.to_string())?;
                app.shutdown().await.map_err(|e| e.to_string())?;
                let mut got = Vec::new();
                app.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(got == vec![i; 100])
            }));
        }
        for app in apps {
            assert_eq!(app.await.unwrap(), Ok(true));
        }
        assert!(admin_get(admin, "/live").await.expect("admin answers").contains("live"));
        gateway.shutdown().await;
    })
    .await;
}
