//! The in-process event bus of the dev mesh, standing in for RabbitMQ
//! behind the same traits: live events through a broadcast channel, and
//! the queues of durable subscriptions in memory (kept while the process
//! runs, with the same acknowledgement and redelivery rules as the
//! broker's).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use crate::events::{
    BoxFuture, BusError, DurableQueues, Event, EventPublisher, EventSource, QueueConsumer,
    QueueSpec, QueuedEvent, Subscription, topic_matches,
};

/// The in-process bus. Live events published while nobody subscribes are
/// not kept; a durable queue keeps what its bindings select.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    sender: broadcast::Sender<Event>,
    queues: Arc<Queues>,
}

/// The durable queues, and a counter every change bumps so that waiting
/// consumers look again.
#[derive(Debug)]
struct Queues {
    by_name: Mutex<HashMap<String, Queue>>,
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct Queue {
    spec: QueueSpec,
    /// Events waiting, oldest first, each with whether it was handed out
    /// before.
    ready: VecDeque<(Event, bool)>,
    /// The consumer receiving the events, with strict order.
    active: Option<u64>,
    /// Consumers in the order they came, for strict order's hand-over.
    consumers: Vec<u64>,
    /// Bumped when the queue is deleted and declared again, so that a
    /// consumer of the old one ends.
    generation: u64,
    /// Events its subscription could not deliver, oldest first.
    dead: VecDeque<Event>,
}

impl Queues {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Queue>> {
        self.by_name
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|version| *version += 1);
    }
}

impl InProcessBus {
    /// A bus on which a live subscriber may fall `capacity` events behind.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        InProcessBus {
            sender,
            queues: Arc::new(Queues {
                by_name: Mutex::new(HashMap::new()),
                changed: watch::channel(0).0,
            }),
        }
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        InProcessBus::new(65_536)
    }
}

impl EventPublisher for InProcessBus {
    fn publish(&self, events: Vec<Event>) -> BoxFuture<'_, Result<(), BusError>> {
        {
            let mut queues = self.queues.lock();
            for event in &events {
                let key = event.routing_key();
                for queue in queues.values_mut() {
                    if queue
                        .spec
                        .bindings
                        .iter()
                        .any(|binding| topic_matches(binding, &key))
                    {
                        queue.ready.push_back((event.clone(), false));
                    }
                }
            }
        }
        self.queues.bump();
        for event in events {
            // No subscriber is not an error: the bus has accepted the event.
            let _ = self.sender.send(event);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

impl EventSource for InProcessBus {
    fn subscribe(&self, _bindings: Vec<String>) -> BoxFuture<'_, Result<Subscription, BusError>> {
        Box::pin(std::future::ready(Ok(Subscription::new(
            self.sender.subscribe(),
            None,
        ))))
    }
}

impl DurableQueues for InProcessBus {
    fn declare(&self, spec: QueueSpec) -> BoxFuture<'_, Result<(), BusError>> {
        {
            let mut queues = self.queues.lock();
            match queues.get_mut(&spec.name) {
                Some(queue) => queue.spec = spec,
                None => {
                    let generation = next_id();
                    queues.insert(
                        spec.name.clone(),
                        Queue {
                            spec,
                            ready: VecDeque::new(),
                            active: None,
                            consumers: Vec::new(),
                            generation,
                            dead: VecDeque::new(),
                        },
                    );
                }
            }
        }
        self.queues.bump();
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        self.queues.lock().remove(name);
        self.queues.bump();
        Box::pin(std::future::ready(Ok(())))
    }

    fn consume<'a>(
        &'a self,
        name: &'a str,
        prefetch: u16,
    ) -> BoxFuture<'a, Result<Box<dyn QueueConsumer>, BusError>> {
        let consumer = {
            let mut queues = self.queues.lock();
            let Some(queue) = queues.get_mut(name) else {
                return Box::pin(std::future::ready(Err(no_queue(name))));
            };
            let id = next_id();
            queue.consumers.push(id);
            if queue.spec.strict_order && queue.active.is_none() {
                queue.active = Some(id);
            }
            InProcessConsumer {
                queues: Arc::clone(&self.queues),
                name: name.to_string(),
                generation: queue.generation,
                id,
                prefetch: usize::from(prefetch.max(1)),
                unacked: BTreeMap::new(),
                next_tag: 1,
            }
        };
        self.queues.bump();
        Box::pin(std::future::ready(Ok(
            Box::new(consumer) as Box<dyn QueueConsumer>
        )))
    }

    fn dead_letter<'a>(
        &'a self,
        name: &'a str,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        let kept = match self.queues.lock().get_mut(name) {
            Some(queue) => {
                queue.dead.push_back(event.clone());
                Ok(())
            }
            None => Err(no_queue(name)),
        };
        Box::pin(std::future::ready(kept))
    }

    fn dead_letters<'a>(
        &'a self,
        name: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Event>, BusError>> {
        let listed = match self.queues.lock().get(name) {
            Some(queue) => Ok(queue.dead.iter().take(limit).cloned().collect()),
            None => Err(no_queue(name)),
        };
        Box::pin(std::future::ready(listed))
    }

    fn replay_dead_letters<'a>(
        &'a self,
        name: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        let replayed = match self.queues.lock().get_mut(name) {
            Some(queue) => {
                let count = limit.min(queue.dead.len());
                let replayed: Vec<Event> = queue.dead.drain(..count).collect();
                queue
                    .ready
                    .extend(replayed.into_iter().map(|event| (event, false)));
                Ok(count)
            }
            None => Err(no_queue(name)),
        };
        self.queues.bump();
        Box::pin(std::future::ready(replayed))
    }
}

fn no_queue(name: &str) -> BusError {
    BusError(format!("no queue {name}"))
}

/// Ids of consumers and queue generations, unique in the process.
fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

struct InProcessConsumer {
    queues: Arc<Queues>,
    name: String,
    generation: u64,
    id: u64,
    prefetch: usize,
    /// Handed out and not acknowledged, by tag.
    unacked: BTreeMap<u64, Event>,
    next_tag: u64,
}

impl InProcessConsumer {
    /// The next event for this consumer if there is one now; Err(()) once
    /// its queue is gone.
    fn take(&mut self) -> Result<Option<QueuedEvent>, ()> {
        let mut queues = self.queues.lock();
        let queue = match queues.get_mut(&self.name) {
            Some(queue) if queue.generation == self.generation => queue,
            _ => return Err(()),
        };
        let my_turn = !queue.spec.strict_order || queue.active == Some(self.id);
        if !my_turn || self.unacked.len() >= self.prefetch {
            return Ok(None);
        }
        let Some((event, redelivered)) = queue.ready.pop_front() else {
            return Ok(None);
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.unacked.insert(tag, event.clone());
        Ok(Some(QueuedEvent {
            tag,
            event,
            redelivered,
        }))
    }
}

impl QueueConsumer for InProcessConsumer {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<QueuedEvent, BusError>>> {
        Box::pin(async move {
            let mut changed = self.queues.changed.subscribe();
            loop {
                changed.mark_unchanged();
                match self.take() {
                    Ok(Some(event)) => return Some(Ok(event)),
                    Ok(None) => {}
                    Err(()) => return None,
                }
                if changed.changed().await.is_err() {
                    return None;
                }
            }
        })
    }

    fn ack(&mut self, tag: u64) -> BoxFuture<'_, Result<(), BusError>> {
        let acked = self.unacked.remove(&tag).is_some();
        self.queues.bump();
        Box::pin(std::future::ready(if acked {
            Ok(())
        } else {
            Err(BusError(format!("no unacknowledged delivery {tag}")))
        }))
    }
}

impl Drop for InProcessConsumer {
    fn drop(&mut self) {
        {
            let mut queues = self.queues.lock();
            if let Some(queue) = queues.get_mut(&self.name)
                && queue.generation == self.generation
            {
                // Back to the front, in the order they were handed out.
                for event in std::mem::take(&mut self.unacked).into_values().rev() {
                    queue.ready.push_front((event, true));
                }
                queue.consumers.retain(|consumer| *consumer != self.id);
                if queue.active == Some(self.id) {
                    queue.active = queue.consumers.first().copied();
                }
            }
        }
        self.queues.bump();
    }
}
