//! A thread of its own for the commit lanes.
//!
//! The lanes are the serial part of the send path: while one batch of a
//! busy inbox commits, the next waits. On the gateway's main runtime a lane
//! woken by its database's answer would queue behind the gRPC work of every
//! caller; on a thread of its own, mostly asleep waiting for the database,
//! it runs as soon as the operating system wakes it. Database connections
//! opened by the lanes are driven by this thread too.

use std::future::Future;

use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

/// The thread the commit lanes of every shard run on.
pub(crate) struct CommitThread {
    handle: Handle,
    tasks: TaskTracker,
}

impl CommitThread {
    /// Starts the thread; it ends once [`CommitThread::finished`] was called
    /// and every task spawned on it has ended.
    pub(crate) fn start() -> std::io::Result<CommitThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let tasks = TaskTracker::new();
        let until_done = tasks.clone();
        std::thread::Builder::new()
            .name("fedmesh-commit".into())
            .spawn(move || runtime.block_on(until_done.wait()))?;
        Ok(CommitThread { handle, tasks })
    }

    /// Runs `task` on the commit thread.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(task, &self.handle);
    }

    /// No more tasks will be spawned: resolves once those spawned ended.
    pub(crate) fn finished(&self) -> impl Future<Output = ()> + Send + 'static {
        self.tasks.close();
        let tasks = self.tasks.clone();
        async move { tasks.wait().await }
    }
}

impl Drop for CommitThread {
    /// A gateway that failed to start never calls [`CommitThread::finished`]:
    /// the thread still ends once the lanes spawned so far have ended.
    fn drop(&mut self) {
        self.tasks.close();
    }
}
