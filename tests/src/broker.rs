//! RabbitMQ for one test: an event exchange of the test's own on the
//! machine's broker, removed when the test ends, and queues bound to it
//! that the test reads directly, as any consumer of the mesh's events would.

use std::time::Duration;

use fedmesh_common::amqp::{EventBusSettings, consume_exclusive, declare_exchange};
use fedmesh_common::events::Event;
use lapin::message::Delivery;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio_stream::StreamExt;

use crate::{TcpProxy, within};

/// The broker tests use: `FEDMESH_TEST_AMQP_URL`, or this machine's.
pub fn broker_url() -> String {
    std::env::var("FEDMESH_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// An exchange of one test's own, deleted when the value is dropped.
pub struct TestBroker {
    /// The broker's URL.
    pub url: String,
    /// The exchange's name, unique to the test.
    pub exchange: String,
    /// Kept open while the test's queues are read.
    _connection: Connection,
    channel: Channel,
    /// Durable queues of subscriptions to delete with the exchange.
    subscriptions: std::sync::Mutex<Vec<String>>,
}

impl TestBroker {
    /// Declares a fresh exchange. Panics with the command that starts
    /// RabbitMQ when the broker cannot be reached: a missing service fails
    /// the test, it never skips it.
    pub async fn start() -> TestBroker {
        let url = broker_url();
        let connection = match Connection::connect(&url, ConnectionProperties::default()).await {
            Ok(connection) => connection,
            Err(error) => panic!(
                "RabbitMQ is not reachable at {url} ({error}); start it with \
                 `rabbitmq-server -detached` or point FEDMESH_TEST_AMQP_URL at a broker"
            ),
        };
        let channel = connection.create_channel().await.unwrap();
        let exchange = format!("fedmesh.test.{}", uuid::Uuid::now_v7().simple());
        declare_exchange(&channel, &exchange).await.unwrap();
        TestBroker {
            url,
            exchange,
            _connection: connection,
            channel,
            subscriptions: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Deletes the queue of subscription `name` when the test ends, whether
    /// or not the test deleted the subscription.
    pub fn forget_subscription_at_end(&self, name: &str) {
        let mut subscriptions = self.subscriptions.lock().unwrap();
        subscriptions.push(format!("{}.sub.{name}", self.exchange));
        subscriptions.push(format!("{}.sub.{name}.dead", self.exchange));
    }

    /// Settings that put a mesh's events on this exchange.
    pub fn settings(&self) -> EventBusSettings {
        EventBusSettings {
            amqp: Some(self.url.clone()),
            amqp_exchange: self.exchange.clone(),
        }
    }

    /// Settings that reach this exchange through `proxy` (which forwards to
    /// the broker), so that a test can take the broker away.
    pub fn settings_through(&self, proxy: &TcpProxy) -> EventBusSettings {
        let through = match self.url.split_once('@') {
            Some((user, rest)) => {
                let path = rest.find('/').map_or("", |slash| &rest[slash..]);
                format!("{user}@{}{path}", proxy.address)
            }
            None => panic!("the broker URL {} has no user", self.url),
        };
        EventBusSettings {
            amqp: Some(through),
            amqp_exchange: self.exchange.clone(),
        }
    }

    /// The broker's address, for a [`TcpProxy`] in front of it.
    pub fn address(&self) -> String {
        let after_user = self
            .url
            .split_once('@')
            .map_or(self.url.as_str(), |(_, rest)| rest);
        let host_port = after_user.split('/').next().unwrap_or(after_user);
        format!("http://{host_port}")
    }

    /// A queue of the test's, bound to the exchange with `binding` (e.g.
    /// `*.*.message.accepted`); it keeps what arrives until read.
    pub async fn queue(&self, binding: &str) -> TestQueue {
        let consumer = consume_exclusive(&self.channel, &self.exchange, &[binding])
            .await
            .unwrap();
        TestQueue { consumer }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let url = self.url.clone();
        let exchange = self.exchange.clone();
        let queues = std::mem::take(&mut *self.subscriptions.lock().unwrap());
        // The test's runtime, which drives this connection, is not running
        // while a value is dropped: a connection of its own, on a runtime of
        // its own, on a thread of its own.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let deleted = tokio::time::timeout(Duration::from_secs(10), async {
                    let connection =
                        Connection::connect(&url, ConnectionProperties::default()).await?;
                    let channel = connection.create_channel().await?;
                    for queue in queues {
                        channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await?;
                    }
                    channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await?;
                    connection.close(200, "test over".into()).await
                })
                .await;
                deleted.ok()?.ok()
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(()))) {
            eprintln!("warning: test exchange {} was not deleted", self.exchange);
        }
    }
}

/// A queue bound to a test's exchange.
pub struct TestQueue {
    consumer: Consumer,
}

impl TestQueue {
    /// The next message on the queue.
    pub async fn next_delivery(&mut self) -> Delivery {
        within("a message on the test queue", self.consumer.next())
            .await
            .expect("the consumer ended")
            .expect("the consumer failed")
    }

    /// The next event on the queue.
    pub async fn next_event(&mut self) -> Event {
        let delivery = self.next_delivery().await;
        Event::from_cloudevent_json(&delivery.data).unwrap()
    }
}
