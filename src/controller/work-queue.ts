/**
 * A work queue with client-go's workqueue semantics (k8s.io/client-go/util/workqueue), for
 * string keys:
 *
 * - **De-duplication.** A key that is waiting is not queued a second time; many events for one
 *   object become one unit of work.
 * - **Per-key serialisation.** A key handed out by {@link WorkQueue.get} is *processing* until
 *   {@link WorkQueue.done}. It is never handed to a second worker meanwhile: added while
 *   processing, it is queued again when `done` is called, so the change is not lost either.
 * - **Delays and per-key exponential backoff** ({@link WorkQueue.addAfter},
 *   {@link WorkQueue.addRateLimited}, {@link WorkQueue.forget}).
 * - **A bound.** The queue holds at most `maxLength` distinct keys (waiting, processing, re-added
 *   while processing, or delayed). `add` beyond it throws {@link QueueFullError}: a full queue is
 *   an overload to surface, never a reason to drop work silently. Because processing keys count,
 *   a worker can always re-queue the key it holds (`addRateLimited`, `addAfter`, `add`).
 *
 * Differences from client-go: after {@link WorkQueue.shutDown} getters reject at once (client-go
 * hands out the keys still waiting first), and the rate limiter jitters downwards so that delays
 * at the cap are spread too.
 */

/** Time and timers, injectable so tests drive them with a fake clock. */
export interface Clock {
  /** Milliseconds since the epoch. */
  now(): number;
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** The process's clock and timers. */
export const systemClock: Clock = {
  now: () => Date.now(),
  setTimeout: (callback, ms) => setTimeout(callback, ms),
  clearTimeout: (handle) => clearTimeout(handle as NodeJS.Timeout),
};

/** Thrown by `add`, `addAfter` and `addRateLimited` when the queue already holds `maxLength` keys. */
export class QueueFullError extends Error {
  override readonly name = 'QueueFullError';
  readonly key: string;
  readonly maxLength: number;
  constructor(queue: string, key: string, maxLength: number) {
    super(`work queue ${queue} is full (${maxLength} keys): cannot add ${key}`);
    this.key = key;
    this.maxLength = maxLength;
  }
}

/** The rejection of `get` once the queue is shut down. */
export class QueueShutDownError extends Error {
  override readonly name = 'QueueShutDownError';
  constructor(queue: string) {
    super(`work queue ${queue} is shut down`);
  }
}

export interface BackoffOptions {
  /** Delay of the first retry; default 500 ms. */
  readonly baseDelayMs?: number;
  /** The cap; default 5 minutes. */
  readonly maxDelayMs?: number;
  /**
   * Fraction of the delay taken off at random, in [0, 1); default 0.2: a retry waits between 80 %
   * and 100 % of `min(maxDelayMs, baseDelayMs * 2^retries)`. Downward, so the cap is never
   * exceeded and keys failing together at the cap still spread out.
   */
  readonly jitter?: number;
  /** Uniform in [0, 1); default Math.random. */
  readonly random?: () => number;
}

/** Per-key exponential backoff with jitter, as client-go's ItemExponentialFailureRateLimiter. */
export interface RateLimiter {
  /** The delay before the next retry of `key`; counts the retry. */
  when(key: string): number;
  /** Resets `key`'s backoff (after a success). */
  forget(key: string): void;
  /** Retries of `key` since it was last forgotten. */
  retries(key: string): number;
}

/** An exponential backoff per key: `min(max, base * 2^retries)`, less up to `jitter` of it. */
export function exponentialBackoff(options: BackoffOptions = {}): RateLimiter {
  const base = options.baseDelayMs ?? 500;
  const max = options.maxDelayMs ?? 5 * 60_000;
  const jitter = options.jitter ?? 0.2;
  const random = options.random ?? Math.random;
  if (!(base > 0) || !(max >= base)) throw new RangeError(`backoff needs 0 < baseDelayMs <= maxDelayMs (got ${base} and ${max})`);
  if (!(jitter >= 0 && jitter < 1)) throw new RangeError(`backoff jitter must be in [0, 1) (got ${jitter})`);
  const failures = new Map<string, number>();
  return {
    when(key) {
      const n = failures.get(key) ?? 0;
      failures.set(key, n + 1);
      // 2^n overflows to Infinity long after the cap; min() keeps that harmless.
      const delay = Math.min(max, base * 2 ** n);
      return delay * (1 - jitter * random());
    },
    forget(key) {
      failures.delete(key);
    },
    retries(key) {
      return failures.get(key) ?? 0;
    },
  };
}

export interface WorkQueueOptions {
  /** For error messages and logs; default `default`. */
  readonly name?: string;
  /** The most distinct keys the queue holds (see the module comment); default 100 000. */
  readonly maxLength?: number;
  /** Options of the default rate limiter. */
  readonly backoff?: BackoffOptions;
  /** Another rate limiter instead (then `backoff` is unused). */
  readonly rateLimiter?: RateLimiter;
  readonly clock?: Clock;
}

interface Waiter<K> {
  resolve(key: K): void;
  reject(err: unknown): void;
}

/**
 * The queue. Keys are plain strings (`namespace/name`, or composite keys); `K` lets a caller
 * narrow them.
 */
export class WorkQueue<K extends string = string> {
  readonly name: string;
  readonly maxLength: number;
  readonly #clock: Clock;
  readonly #limiter: RateLimiter;
  /** Keys ready to be handed out, FIFO: `#items[#head..]`, with `#waiting` for membership. */
  #items: K[] = [];
  #head = 0;
  readonly #waiting = new Set<K>();
  readonly #processing = new Set<K>();
  /** Processing keys added again: queued when `done` is called. */
  readonly #readded = new Set<K>();
  /** Keys waiting for a delay; the earliest deadline wins, as client-go's delaying queue. */
  readonly #delayed = new Map<K, { at: number; timer: unknown }>();
  /** How many distinct keys are in any of the sets above (the quantity `maxLength` bounds). */
  #held = 0;
  readonly #getters: Waiter<K>[] = [];
  #shuttingDown = false;
  readonly #drainWaiters: (() => void)[] = [];

  constructor(options: WorkQueueOptions = {}) {
    this.name = options.name ?? 'default';
    this.maxLength = options.maxLength ?? 100_000;
    if (!(this.maxLength >= 1)) throw new RangeError(`maxLength must be at least 1 (got ${this.maxLength})`);
    this.#clock = options.clock ?? systemClock;
    this.#limiter = options.rateLimiter ?? exponentialBackoff(options.backoff);
  }

  /** Keys waiting to be handed out (neither processing nor delayed). */
  get len(): number {
    return this.#waiting.size;
  }

  /** Keys handed out and not yet `done`. */
  get processing(): number {
    return this.#processing.size;
  }

  /** Keys waiting for a delay (`addAfter`, `addRateLimited`). */
  get delayed(): number {
    return this.#delayed.size;
  }

  /** Distinct keys held, the quantity bounded by `maxLength`. */
  get size(): number {
    return this.#held;
  }

  get shuttingDown(): boolean {
    return this.#shuttingDown;
  }

  /**
   * Queues `key` unless it is already waiting. A key being processed is queued again once it is
   * `done`. Ignored after shut down (nothing would process it).
   * @throws {QueueFullError} when the key is new and the queue holds `maxLength` keys.
   */
  add(key: K): void {
    if (this.#shuttingDown) return;
    if (this.#waiting.has(key) || this.#readded.has(key)) return;
    this.#reserve(key);
    if (this.#processing.has(key)) {
      this.#readded.add(key);
      return;
    }
    this.#enqueue(key);
  }

  /**
   * Adds `key` after `delayMs` (at once when it is not positive). A key already delayed keeps the
   * earlier of the two deadlines.
   * @throws {QueueFullError} as `add`.
   */
  addAfter(key: K, delayMs: number): void {
    if (this.#shuttingDown) return;
    if (!(delayMs > 0)) {
      this.add(key);
      return;
    }
    const at = this.#clock.now() + delayMs;
    const existing = this.#delayed.get(key);
    if (existing) {
      if (existing.at <= at) return;
      this.#clock.clearTimeout(existing.timer);
    } else {
      this.#reserve(key);
    }
    const timer = this.#clock.setTimeout(() => this.#fire(key, timer), delayMs);
    this.#delayed.set(key, { at, timer });
  }

  /**
   * Adds `key` after its backoff: 500 ms, 1 s, 2 s, … up to 5 minutes by default, jittered. Each
   * call counts a retry until {@link forget}.
   * @throws {QueueFullError} as `add`.
   */
  addRateLimited(key: K): void {
    if (this.#shuttingDown) return;
    // Check the bound before counting a retry that would not happen.
    if (!this.#isHeld(key) && this.#held >= this.maxLength) throw new QueueFullError(this.name, key, this.maxLength);
    this.addAfter(key, this.#limiter.when(key));
  }

  /** Resets `key`'s backoff: call it when the key was processed successfully. */
  forget(key: K): void {
    this.#limiter.forget(key);
  }

  /** Retries counted for `key` since it was last forgotten. */
  retries(key: K): number {
    return this.#limiter.retries(key);
  }

  /**
   * The next key, FIFO, waiting for one if none is ready. The key is processing until `done`.
   * Rejects with {@link QueueShutDownError} on shut down, or with the signal's reason on abort
   * (a key is never consumed by an aborted `get`).
   */
  get(signal?: AbortSignal): Promise<K> {
    if (this.#shuttingDown) return Promise.reject(new QueueShutDownError(this.name));
    if (signal?.aborted) return Promise.reject(signal.reason);
    const key = this.#dequeue();
    if (key !== undefined) return Promise.resolve(key);
    return new Promise<K>((resolve, reject) => {
      const onAbort = () => {
        const i = this.#getters.indexOf(waiter);
        if (i >= 0) this.#getters.splice(i, 1);
        reject(signal!.reason);
      };
      const waiter: Waiter<K> = {
        resolve: (k) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(k);
        },
        reject: (err) => {
          signal?.removeEventListener('abort', onAbort);
          reject(err);
        },
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.#getters.push(waiter);
    });
  }

  /** Ends the processing of `key`; queues it again if it was added meanwhile. */
  done(key: K): void {
    if (!this.#processing.delete(key)) return;
    if (this.#readded.delete(key)) {
      this.#enqueue(key);
    } else {
      this.#release(key);
    }
    if (this.#processing.size === 0) for (const drained of this.#drainWaiters.splice(0)) drained();
  }

  /**
   * Stops the queue: no new keys, pending and later `get`s reject with
   * {@link QueueShutDownError}, delayed keys are dropped. `done` still works.
   */
  shutDown(): void {
    if (this.#shuttingDown) return;
    this.#shuttingDown = true;
    for (const { timer } of this.#delayed.values()) this.#clock.clearTimeout(timer);
    this.#delayed.clear();
    this.#waiting.clear();
    this.#readded.clear();
    this.#items = [];
    this.#head = 0;
    this.#held = this.#processing.size;
    const err = new QueueShutDownError(this.name);
    for (const w of this.#getters.splice(0)) w.reject(err);
  }

  /**
   * {@link shutDown}, then waits until every key handed out is `done`, at most `timeoutMs`
   * (default 30 s). Resolves true when drained, false on timeout.
   */
  shutDownWithDrain(timeoutMs = 30_000): Promise<boolean> {
    this.shutDown();
    if (this.#processing.size === 0) return Promise.resolve(true);
    return new Promise<boolean>((resolve) => {
      const drained = () => {
        this.#clock.clearTimeout(timer);
        resolve(true);
      };
      const timer = this.#clock.setTimeout(() => {
        const i = this.#drainWaiters.indexOf(drained);
        if (i >= 0) this.#drainWaiters.splice(i, 1);
        resolve(false);
      }, timeoutMs);
      this.#drainWaiters.push(drained);
    });
  }

  // --- internals ------------------------------------------------------------------------------

  #isHeld(key: K): boolean {
    return this.#waiting.has(key) || this.#processing.has(key) || this.#readded.has(key) || this.#delayed.has(key);
  }

  /** Counts `key` as held if it is not yet, or throws when that would exceed the bound. */
  #reserve(key: K): void {
    if (this.#isHeld(key)) return;
    if (this.#held >= this.maxLength) throw new QueueFullError(this.name, key, this.maxLength);
    this.#held++;
  }

  /** Uncounts `key` if nothing holds it any more. */
  #release(key: K): void {
    if (!this.#isHeld(key)) this.#held--;
  }

  /** Makes a held key ready: to a waiting getter at once, else to the end of the queue. */
  #enqueue(key: K): void {
    const getter = this.#getters.shift();
    if (getter) {
      this.#processing.add(key);
      getter.resolve(key);
      return;
    }
    this.#waiting.add(key);
    this.#items.push(key);
  }

  #dequeue(): K | undefined {
    if (this.#head >= this.#items.length) return undefined;
    const key = this.#items[this.#head++]!;
    // Compact now and then so the array does not grow with every key ever queued.
    if (this.#head > 1024 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    this.#waiting.delete(key);
    this.#processing.add(key);
    return key;
  }

  #fire(key: K, timer: unknown): void {
    const entry = this.#delayed.get(key);
    if (!entry || entry.timer !== timer) return;
    this.#delayed.delete(key);
    if (this.#shuttingDown) return;
    if (this.#waiting.has(key) || this.#readded.has(key)) return; // still held as such: #held is unchanged
    // Still held through the delay's reservation: moving it on never exceeds the bound.
    if (this.#processing.has(key)) this.#readded.add(key);
    else this.#enqueue(key);
  }
}
