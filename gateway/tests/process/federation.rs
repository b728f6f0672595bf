//! Two `elsinore run` processes federating over real mTLS, every listener
//! bound where the config file says.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::harness::{
    Export, GatewaySpec, Net, Proc, WAIT, accepts, dns_a, export_names, get_json, http_get_host,
    imported_from, spawn_backend, wait_for,
};

#[test]
fn run_binds_the_configured_listeners_and_a_second_process_imports_its_exports() {
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let backend = spawn_backend(net.ip(30), "reviews", Arc::new(|| {}));
    let mut a = GatewaySpec::new(&net, 10, "mesh-a", dir.path());
    let mut b = GatewaySpec::new(&net, 20, "mesh-b", dir.path());
    a.exports = vec![Export::new("reviews", backend, &["mesh-b"])];
    a.peers = vec![b.as_peer(false)];
    b.peers = vec![a.as_peer(true)];
    let (config_a, config_b) = (a.config_path(dir.path()), b.config_path(dir.path()));
    a.write(&config_a);
    b.write(&config_b);

    let mut pa = Proc::run("mesh-a", &config_a, &[]);
    pa.wait_ready(a.admin);
    // Every listener is where the config put it, and says so in the log.
    for (what, addr) in [
        ("federation", a.federation),
        ("admin", a.admin),
        ("ingress", a.ingress),
        ("egress", a.egress),
        ("dns (tcp)", a.dns),
    ] {
        assert!(accepts(addr), "mesh-a's {what} listener is not on {addr}");
    }
    let started = pa.wait_log_after(0, &["gateway started"], WAIT);
    assert!(
        started.contains(&format!("federation={}", a.federation))
            && started.contains(&format!("admin={}", a.admin)),
        "{started}"
    );
    let catalog = get_json(a.admin, "/catalog").unwrap();
    assert_eq!(catalog["mesh"], "mesh-a");
    assert_eq!(
        export_names(&catalog),
        [("reviews".to_owned(), "reviews.mesh-a.global".to_owned())].into()
    );

    let mut pb = Proc::run("mesh-b", &config_b, &[]);
    pb.wait_ready(b.admin);
    wait_for("mesh-b to import reviews from mesh-a", WAIT, || {
        let c = get_json(b.admin, "/catalog")?;
        let names = imported_from(&c, "mesh-a");
        let state = &c["imports"]["mesh-a"]["state"];
        if names == ["reviews.mesh-a.global"] && state == "synced" {
            Ok(())
        } else {
            Err(format!("state {state}, imports {names:?}"))
        }
    });
    // mesh-a served that stream to mesh-b's certificate over mTLS.
    let peers = get_json(a.admin, "/peers").unwrap();
    assert_eq!(peers["peers"][0]["name"], "mesh-b");
    assert_eq!(peers["peers"][0]["owner"]["streamsOpen"], 1, "{peers:#}");

    // The data path across both processes: mesh-b's egress (routing by
    // Host), mTLS to mesh-a's ingress, the backend.
    let (status, body) = wait_for(
        "a request through both gateways",
        WAIT,
        || match http_get_host(b.egress, "reviews.mesh-a.global", "/") {
            Ok((200, body)) => Ok((200, body)),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            "hello from reviews (called by spiffe://mesh-b.test/ns/elsinore/sa/gateway)"
        )
    );

    // mesh-b's DNS listener (where its config put it) answers the
    // imported name with a VIP from its configured `proxy.vipRange`, and
    // that VIP carries the request too.
    let vip = wait_for("mesh-b's DNS answer", WAIT, || {
        dns_a(b.dns, "reviews.mesh-a.global")
    });
    let (range, prefix) = b.vip_range.split_once('/').unwrap();
    let range: Ipv4Addr = range.parse().unwrap();
    let mask = u32::MAX << (32 - prefix.parse::<u32>().unwrap());
    assert_eq!(
        u32::from(vip) & mask,
        u32::from(range),
        "{vip} is not in {}",
        b.vip_range
    );
    let via_vip = SocketAddr::from((vip, backend.port()));
    let (status, body) = wait_for("a request to the VIP", WAIT, || {
        match http_get_host(via_vip, "reviews.mesh-a.global", "/") {
            Ok((200, body)) => Ok((200, body)),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(
        status == 200 && body.starts_with("hello from reviews"),
        "{body}"
    );

    // A new export written to mesh-a's file reaches mesh-b live.
    a.exports.push(Export::new("ratings", backend, &["mesh-b"]));
    a.replace(&config_a);
    wait_for(
        "mesh-b to import ratings after mesh-a's reload",
        WAIT,
        || {
            let c = get_json(b.admin, "/catalog")?;
            let names = imported_from(&c, "mesh-a");
            if names == ["ratings.mesh-a.global", "reviews.mesh-a.global"] {
                Ok(())
            } else {
                Err(format!("{names:?}"))
            }
        },
    );

    // Both stop on SIGTERM, with a federation stream open between them.
    for (p, admin) in [(&mut pa, a.admin), (&mut pb, b.admin)] {
        p.stop();
        assert!(
            !accepts(admin),
            "{}'s admin still accepts after exit",
            p.name
        );
    }
}
