//! The cheapest relay tokio allows, for `bench/relay-latency --byte-relay`: it accepts a charger,
//! dials the upstream and copies bytes both ways (`tokio::io::copy_bidirectional`), the HTTP
//! upgrade included, parsing nothing and storing nothing. Beside nginx it shows what the bridge
//! costs above the runtime it is built on: whatever the bridge spends beyond this path is its
//! WebSocket framing, its tap and its spool, not tokio. Benchmarks only; loopback.
//!
//! `cargo run --release --example byte_relay -- --listen 127.0.0.1:8180 --upstream 127.0.0.1:9000`

use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut listen, mut upstream) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--listen", Some(value)) => listen = Some(value),
            ("--upstream", Some(value)) => upstream = Some(value),
            _ => {
                return Err(
                    format!("usage: byte_relay --listen ADDR --upstream ADDR (at {flag})").into(),
                );
            }
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else {
        return Err("usage: byte_relay --listen ADDR --upstream ADDR".into());
    };
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (mut charger, peer) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let relayed = async {
                // As the bridge and nginx do: small frames go out at once.
                charger.set_nodelay(true)?;
                let mut central = TcpStream::connect(&upstream).await?;
                central.set_nodelay(true)?;
                tokio::io::copy_bidirectional(&mut charger, &mut central).await
            };
            if let Err(error) = relayed.await {
                eprintln!("byte_relay: {peer}: {error}");
            }
        });
    }
}
