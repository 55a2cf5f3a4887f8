/**
 * Workers over a {@link WorkQueue}: N loops take keys and run a handler, with client-go's
 * controller conventions for the outcome (success forgets the key's backoff, a retry or an error
 * re-queues it rate-limited), plus what a controller needs around that: aborting the handler of
 * one key when its object goes away, stopping gracefully or at once, and live counts.
 *
 * Also {@link createKeyedSemaphore}, to cap concurrent work per key (per registry host) across
 * all workers.
 */
import type { Logger } from 'pino';
import { systemClock, type Clock, type WorkQueue } from './work-queue.ts';

/**
 * What the handler made of a key: `done` (forget its backoff), `retry` (again after its backoff),
 * or `{ after }` (done for now, again after `after` ms: a periodic re-check).
 */
export type HandlerOutcome = 'done' | 'retry' | { readonly after: number };

/**
 * Processes one key. `signal` aborts when the key is cancelled ({@link WorkerPool.cancel}) or the
 * pool is destroyed; a handler should stop soon after.
 */
export type KeyHandler<K extends string = string> = (key: K, signal: AbortSignal) => Promise<HandlerOutcome>;

export interface WorkerPoolOptions<K extends string = string> {
  readonly queue: WorkQueue<K>;
  /** Number of workers, at least 1. */
  readonly concurrency: number;
  readonly handler: KeyHandler<K>;
  readonly logger: Logger;
  /** Timers of `close({ timeoutMs })`; default the system clock. */
  readonly clock?: Clock;
}

export interface WorkerPool<K extends string = string> {
  /** Starts the workers (once; later calls do nothing). Keys queued before wait until then. */
  start(): void;
  /**
   * Aborts the signal of the handler running for `key`, if any. Its outcome is then ignored: no
   * retry, the backoff is forgotten (the object was deleted or changed; a new `add` for the key
   * runs it afresh once the aborted handler has returned). Returns whether a handler was running.
   */
  cancel(key: K, reason?: unknown): boolean;
  /**
   * Stops taking keys and waits for the running handlers to finish, aborting nothing. With
   * `timeoutMs`, handlers still running then are aborted (and their keys queued again), and
   * `close` resolves once they have returned.
   */
  close(options?: { readonly timeoutMs?: number }): Promise<void>;
  /** Stops taking keys and aborts every running handler at once; their keys are queued again. */
  destroy(reason?: unknown): Promise<void>;
  /** Handlers running now. */
  readonly running: number;
  /** Keys ready in the queue (not delayed, not processing). */
  readonly queued: number;
  /** Handler runs that ended with `done` or `{ after }`. */
  readonly completed: number;
  /** Handler runs that threw (they are retried). */
  readonly failed: number;
  /** Handler runs that asked for `retry`. */
  readonly retried: number;
  /** Handler runs cancelled by {@link WorkerPool.cancel}. */
  readonly cancelled: number;
}

/** Why a running handler's signal was aborted. */
type AbortCause = 'cancel' | 'stop';

interface Run {
  readonly controller: AbortController;
  cause?: AbortCause;
}

/** The message of a thrown value, for logs. */
function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Creates the pool; call `start()` to run it. */
export function createWorkerPool<K extends string = string>(options: WorkerPoolOptions<K>): WorkerPool<K> {
  const { queue, handler, logger } = options;
  const clock = options.clock ?? systemClock;
  const concurrency = options.concurrency;
  if (!Number.isInteger(concurrency) || concurrency < 1) throw new RangeError(`concurrency must be a positive integer (got ${concurrency})`);

  const runs = new Map<K, Run>();
  // Aborted to stop taking keys: rejects the workers' pending `get`s, never a handler.
  const stopTaking = new AbortController();
  let workers: Promise<void>[] = [];
  let started = false;
  let stopping = false;
  let destroyed = false;
  let completed = 0;
  let failed = 0;
  let retried = 0;
  let cancelled = 0;

  const requeue = (what: string, key: K, fn: () => void) => {
    try {
      fn();
    } catch (err) {
      // The queue holds the key while it is processing, so this is not QueueFullError in practice;
      // still, a key that cannot be re-queued must be visible in the logs.
      logger.error({ key, err: messageOf(err) }, `could not ${what} ${key}: ${messageOf(err)}`);
    }
  };

  const runKey = async (key: K): Promise<void> => {
    if (destroyed) {
      // Handed out just as destroy() ran: give it back rather than start it.
      requeue('re-queue', key, () => queue.add(key));
      queue.done(key);
      return;
    }
    const run: Run = { controller: new AbortController() };
    runs.set(key, run);
    try {
      let outcome: HandlerOutcome;
      try {
        outcome = await handler(key, run.controller.signal);
      } catch (err) {
        if (run.cause === 'cancel') {
          cancelled++;
          queue.forget(key);
          logger.debug({ key }, 'handler cancelled');
        } else if (run.cause === 'stop') {
          requeue('re-queue', key, () => queue.add(key));
        } else {
          failed++;
          const retries = queue.retries(key);
          logger.error({ key, err: messageOf(err), retries }, `handler for ${key} failed (retry ${retries + 1}): ${messageOf(err)}`);
          requeue('retry', key, () => queue.addRateLimited(key));
        }
        return;
      }
      if (run.cause === 'cancel') {
        cancelled++;
        queue.forget(key);
        return;
      }
      if (run.cause === 'stop') {
        // Interrupted by close's timeout or destroy: the work is not known to be complete.
        requeue('re-queue', key, () => queue.add(key));
        return;
      }
      if (outcome === 'done') {
        completed++;
        queue.forget(key);
      } else if (outcome === 'retry') {
        retried++;
        requeue('retry', key, () => queue.addRateLimited(key));
      } else if (typeof outcome === 'object' && outcome !== null && typeof outcome.after === 'number') {
        completed++;
        queue.forget(key);
        requeue('re-queue', key, () => queue.addAfter(key, outcome.after));
      } else {
        failed++;
        logger.error({ key, outcome }, `handler for ${key} returned an unknown outcome; retrying`);
        requeue('retry', key, () => queue.addRateLimited(key));
      }
    } finally {
      runs.delete(key);
      queue.done(key);
    }
  };

  const worker = async (): Promise<void> => {
    for (;;) {
      if (stopping) return;
      let key: K;
      try {
        key = await queue.get(stopTaking.signal);
      } catch {
        return; // the pool stops taking keys, or the queue was shut down
      }
      await runKey(key);
    }
  };

  const abortAll = (reason: unknown) => {
    for (const run of runs.values()) {
      if (run.controller.signal.aborted) continue;
      run.cause ??= 'stop';
      run.controller.abort(reason);
    }
  };

  const stopTakingKeys = () => {
    stopping = true;
    stopTaking.abort(new Error('worker pool stopping'));
  };

  return {
    start() {
      if (started || stopping) return;
      started = true;
      workers = Array.from({ length: concurrency }, () => worker());
    },
    cancel(key, reason) {
      const run = runs.get(key);
      if (!run || run.controller.signal.aborted) return false;
      run.cause = 'cancel';
      run.controller.abort(reason ?? new Error(`${key} was cancelled`));
      return true;
    },
    async close(closeOptions = {}) {
      stopTakingKeys();
      const all = Promise.all(workers).then(() => undefined);
      const { timeoutMs } = closeOptions;
      if (timeoutMs === undefined) return all;
      let timer: unknown;
      const timedOut = await Promise.race([
        all.then(() => false),
        new Promise<boolean>((resolve) => {
          timer = clock.setTimeout(() => resolve(true), timeoutMs);
        }),
      ]);
      clock.clearTimeout(timer);
      if (timedOut) {
        logger.warn({ running: [...runs.keys()], timeoutMs }, `${runs.size} handlers still running after ${timeoutMs} ms; aborting them`);
        abortAll(new Error(`worker pool closed: handlers aborted after ${timeoutMs} ms`));
        await all;
      }
    },
    async destroy(reason) {
      destroyed = true;
      stopTakingKeys();
      abortAll(reason ?? new Error('worker pool destroyed'));
      await Promise.all(workers);
    },
    get running() {
      return runs.size;
    },
    get queued() {
      return queue.len;
    },
    get completed() {
      return completed;
    },
    get failed() {
      return failed;
    },
    get retried() {
      return retried;
    },
    get cancelled() {
      return cancelled;
    },
  };
}

/** Caps concurrent holders per key; see {@link createKeyedSemaphore}. */
export interface KeyedSemaphore {
  /**
   * Resolves with a release function once fewer than the limit hold `key` (FIFO among waiters).
   * Rejects with the signal's reason if it aborts first. Calling the release twice is harmless.
   */
  acquire(key: string, signal?: AbortSignal): Promise<() => void>;
  /** Holders of `key` now. */
  active(key: string): number;
  /** Waiters for `key` now. */
  waiting(key: string): number;
}

/**
 * A semaphore per key: at most `limitPerKey` concurrent holders of each key, keys independent
 * (used to cap concurrent pulls per registry host while other hosts proceed).
 */
export function createKeyedSemaphore(limitPerKey: number): KeyedSemaphore {
  if (!Number.isInteger(limitPerKey) || limitPerKey < 1) throw new RangeError(`limitPerKey must be a positive integer (got ${limitPerKey})`);
  interface Slot {
    active: number;
    readonly waiters: (() => void)[];
  }
  const slots = new Map<string, Slot>();

  const releaser = (key: string, slot: Slot) => {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = slot.waiters.shift();
      if (next) {
        next(); // the slot passes straight to the next waiter: `active` is unchanged
        return;
      }
      slot.active--;
      if (slot.active === 0) slots.delete(key);
    };
  };

  return {
    acquire(key, signal) {
      if (signal?.aborted) return Promise.reject(signal.reason);
      let slot = slots.get(key);
      if (!slot) slots.set(key, (slot = { active: 0, waiters: [] }));
      const s = slot;
      if (s.active < limitPerKey) {
        s.active++;
        return Promise.resolve(releaser(key, s));
      }
      return new Promise((resolve, reject) => {
        const onAbort = () => {
          const i = s.waiters.indexOf(grant);
          if (i >= 0) s.waiters.splice(i, 1);
          reject(signal!.reason);
        };
        const grant = () => {
          signal?.removeEventListener('abort', onAbort);
          resolve(releaser(key, s));
        };
        signal?.addEventListener('abort', onAbort, { once: true });
        s.waiters.push(grant);
      });
    },
    active(key) {
      return slots.get(key)?.active ?? 0;
    },
    waiting(key) {
      return slots.get(key)?.waiters.length ?? 0;
    },
  };
}
