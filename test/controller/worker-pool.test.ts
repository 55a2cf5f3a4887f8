/**
 * The worker pool over a real WorkQueue, one behaviour per test: outcomes and backoff, error
 * logging, per-key serialisation, cancel, close and destroy, live counts; and the keyed
 * semaphore. Handlers are blocked on gates so every moment is checked deterministically; a fake
 * clock drives the delays where they matter.
 */
import { Writable } from 'node:stream';
import { pino } from 'pino';
import t from 'tap';
import { FakeClock, flush } from '../helpers/fake-clock.ts';
import { WorkQueue } from '../../src/controller/work-queue.ts';
import { createKeyedSemaphore, createWorkerPool, type HandlerOutcome } from '../../src/controller/worker-pool.ts';

/**
 * Flushes until `cond` holds, for 5 s at most. Bounded by time, not by turns: some tests wait on
 * real millisecond timers, and a loaded machine runs many turns before one fires.
 */
async function until(what: string, cond: () => boolean): Promise<void> {
  const deadline = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`never happened: ${what}`);
    await flush();
  }
}

interface LogLine {
  level: number;
  msg: string;
  key?: string;
  err?: string;
  [k: string]: unknown;
}

function capturingLogger() {
  const lines: LogLine[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(JSON.parse(chunk.toString()) as LogLine);
      cb();
    },
  });
  return { logger: pino({ level: 'debug' }, stream), lines };
}

/** A promise to resolve by hand. */
function gate<T = void>() {
  let open!: (v: T) => void;
  const promise = new Promise<T>((r) => (open = r));
  return { promise, open };
}

/** Resolves `outcome` when the gate opens, rejects with the signal's reason when it aborts. */
function blockUntil(g: Promise<unknown>, signal: AbortSignal, outcome: HandlerOutcome = 'done'): Promise<HandlerOutcome> {
  return new Promise((resolve, reject) => {
    signal.addEventListener('abort', () => reject(signal.reason), { once: true });
    void g.then(() => resolve(outcome));
  });
}

const silent = pino({ level: 'silent' });

t.test('N workers run keys concurrently, never more than N; live counts follow', async (t) => {
  const q = new WorkQueue();
  const g = gate();
  let concurrent = 0;
  let peak = 0;
  const pool = createWorkerPool({
    queue: q,
    concurrency: 3,
    logger: silent,
    handler: async () => {
      peak = Math.max(peak, ++concurrent);
      await g.promise;
      concurrent--;
      return 'done';
    },
  });
  for (let i = 0; i < 10; i++) q.add(`k${i}`);
  await flush();
  t.equal(pool.running, 0, 'nothing runs before start');
  pool.start();
  pool.start();
  await until('three running', () => pool.running === 3);
  t.equal(pool.queued, 7, 'the rest wait in the queue');
  t.equal(pool.completed, 0);
  g.open();
  await until('all done', () => pool.completed === 10);
  t.equal(peak, 3, 'never more than 3 at once');
  t.equal(pool.running, 0);
  t.equal(pool.queued, 0);
  t.equal(pool.failed, 0);
  await pool.close();
  t.throws(() => createWorkerPool({ queue: q, concurrency: 0, logger: silent, handler: async () => 'done' }), RangeError);
});

t.test("'retry' re-queues the key rate-limited; 'done' forgets its backoff", async (t) => {
  const q = new WorkQueue({ backoff: { baseDelayMs: 1, maxDelayMs: 5, jitter: 0 } });
  const seen: number[] = [];
  const pool = createWorkerPool({
    queue: q,
    concurrency: 2,
    logger: silent,
    handler: async (key) => {
      seen.push(q.retries(key));
      return seen.length < 3 ? 'retry' : 'done';
    },
  });
  pool.start();
  q.add('m');
  await until('three runs', () => pool.completed === 1);
  t.same(seen, [0, 1, 2], 'each retry counted before the next run');
  t.equal(q.retries('m'), 0, 'forgotten after done');
  t.equal(pool.retried, 2);
  t.equal(pool.failed, 0);
  await pool.close();
});

t.test('{ after } runs the key again after the delay, with its backoff forgotten', async (t) => {
  const clock = new FakeClock();
  const q = new WorkQueue({ clock, backoff: { random: () => 0 } });
  const runs: number[] = [];
  q.addRateLimited('m'); // a retry is counted, to see it forgotten
  const pool = createWorkerPool({
    queue: q,
    concurrency: 1,
    logger: silent,
    clock,
    handler: async () => {
      runs.push(clock.now());
      return runs.length === 1 ? { after: 60_000 } : 'done';
    },
  });
  pool.start();
  await clock.advance(500);
  t.same(runs, [500]);
  t.equal(q.retries('m'), 0, 'backoff forgotten');
  t.equal(q.delayed, 1, 'waiting for its re-check');
  await clock.advance(59_999);
  t.same(runs, [500], 'not before the delay');
  await clock.advance(1);
  t.same(runs, [500, 60_500], 'again after 60 s');
  t.equal(pool.completed, 2);
  await pool.close();
});

t.test('a handler error is logged with the key and the message, and the key is retried', async (t) => {
  const { logger, lines } = capturingLogger();
  const q = new WorkQueue({ backoff: { baseDelayMs: 1, jitter: 0 } });
  let calls = 0;
  const pool = createWorkerPool({
    queue: q,
    concurrency: 1,
    logger,
    handler: async () => {
      if (++calls === 1) throw new Error('registry.example.com: connection refused');
      return 'done';
    },
  });
  pool.start();
  q.add('kmm-ops/nvidia-gpu');
  await until('retried to success', () => pool.completed === 1);
  t.equal(pool.failed, 1);
  t.equal(calls, 2, 'run again after the failure');
  const errors = lines.filter((l) => l.level === 50);
  t.equal(errors.length, 1);
  t.match(errors[0], { key: 'kmm-ops/nvidia-gpu', err: 'registry.example.com: connection refused', retries: 0 });
  t.match(errors[0]?.msg, /kmm-ops\/nvidia-gpu.*connection refused/, 'the message names both');
  await pool.close();
});

t.test('a key added while its handler runs waits for it (per-key serialisation)', async (t) => {
  const q = new WorkQueue();
  const gates = [gate(), gate()];
  let runs = 0;
  let concurrent = 0;
  let peak = 0;
  const pool = createWorkerPool({
    queue: q,
    concurrency: 4,
    logger: silent,
    handler: async () => {
      const g = gates[runs++]!;
      peak = Math.max(peak, ++concurrent);
      await g.promise;
      concurrent--;
      return 'done';
    },
  });
  pool.start();
  q.add('m');
  await until('running', () => pool.running === 1);
  q.add('m');
  q.add('m');
  await flush();
  await flush();
  t.equal(pool.running, 1, 'idle workers do not take the key');
  t.equal(runs, 1);
  gates[0]!.open();
  await until('second run', () => runs === 2);
  gates[1]!.open();
  await until('both done', () => pool.completed === 2);
  t.equal(peak, 1);
  t.equal(runs, 2, 'the two adds during the run made one more run');
  await pool.close();
});

t.test('cancel aborts the handler of that key only, and its outcome is ignored', async (t) => {
  const q = new WorkQueue({ backoff: { baseDelayMs: 1 } });
  const g = gate();
  const signals = new Map<string, AbortSignal>();
  const pool = createWorkerPool({
    queue: q,
    concurrency: 3,
    logger: silent,
    handler: (key, signal) => {
      signals.set(key, signal);
      return blockUntil(g.promise, signal);
    },
  });
  pool.start();
  for (const k of ['a', 'b', 'c']) q.add(k);
  await until('three running', () => pool.running === 3);
  t.equal(pool.cancel('b', new Error('Module deleted')), true);
  t.equal(pool.cancel('zzz'), false, 'no handler for that key');
  t.equal(signals.get('b')?.aborted, true, "b's signal aborted");
  t.match(signals.get('b')?.reason, { message: 'Module deleted' });
  t.equal(signals.get('a')?.aborted, false, 'a untouched');
  t.equal(signals.get('c')?.aborted, false, 'c untouched');
  await until('b ended', () => pool.running === 2);
  t.equal(pool.cancelled, 1);
  t.equal(pool.failed, 0, 'the abort is not a failure');
  t.equal(q.retries('b'), 0, 'nor retried');
  t.equal(q.delayed + q.len, 0, 'nothing re-queued');
  g.open();
  await until('a and c done', () => pool.completed === 2);
  await pool.close();
});

t.test('close stops taking keys and waits for running handlers, aborting nothing', async (t) => {
  const q = new WorkQueue();
  const g = gate();
  let signal: AbortSignal | undefined;
  const ran: string[] = [];
  const pool = createWorkerPool({
    queue: q,
    concurrency: 1,
    logger: silent,
    handler: (key, s) => {
      ran.push(key);
      signal = s;
      return blockUntil(g.promise, s);
    },
  });
  pool.start();
  q.add('a');
  await until('a running', () => pool.running === 1);
  q.add('b');
  let closed = false;
  const p = pool.close().then(() => (closed = true));
  for (let i = 0; i < 20; i++) await flush();
  t.equal(closed, false, 'close waits for a');
  t.equal(signal?.aborted, false, 'and does not abort it');
  g.open();
  await p;
  t.same(ran, ['a'], 'b was not taken');
  t.equal(q.len, 1, 'b is still queued');
  t.equal(pool.completed, 1);
});

t.test('close({ timeoutMs }) aborts the handlers still running then, and re-queues their keys', async (t) => {
  const clock = new FakeClock();
  const q = new WorkQueue({ clock });
  let signal: AbortSignal | undefined;
  const { logger, lines } = capturingLogger();
  const pool = createWorkerPool({
    queue: q,
    concurrency: 2,
    logger,
    clock,
    handler: (_key, s) => {
      signal = s;
      return blockUntil(new Promise(() => undefined), s);
    },
  });
  pool.start();
  q.add('slow');
  await until('running', () => pool.running === 1);
  let closed = false;
  const p = pool.close({ timeoutMs: 10_000 }).then(() => (closed = true));
  await clock.advance(9_999);
  t.equal(closed, false);
  t.equal(signal?.aborted, false, 'not aborted before the timeout');
  await clock.advance(1);
  await p;
  t.equal(signal?.aborted, true, 'aborted at the timeout');
  t.equal(pool.running, 0);
  t.equal(q.len, 1, 'the interrupted key is queued again');
  t.ok(lines.some((l) => l.level === 40 && /aborting/.test(l.msg)), 'and the abort is logged');
});

t.test('destroy aborts every running handler at once', async (t) => {
  const q = new WorkQueue();
  const signals: AbortSignal[] = [];
  const pool = createWorkerPool({
    queue: q,
    concurrency: 3,
    logger: silent,
    handler: (_key, s) => {
      signals.push(s);
      return blockUntil(new Promise(() => undefined), s);
    },
  });
  pool.start();
  for (const k of ['a', 'b', 'c', 'd']) q.add(k);
  await until('three running', () => pool.running === 3);
  await pool.destroy();
  t.equal(signals.length, 3, 'd never started');
  t.ok(signals.every((s) => s.aborted), 'all three aborted');
  t.equal(pool.running, 0);
  t.equal(pool.failed, 0, 'aborts are not failures');
  t.equal(q.len, 4, 'the interrupted keys are queued again, with d');
});

t.test('the keyed semaphore caps holders per key and not across keys', async (t) => {
  const sem = createKeyedSemaphore(2);
  const a1 = await sem.acquire('quay.io');
  const a2 = await sem.acquire('quay.io');
  let a3: (() => void) | undefined;
  const p3 = sem.acquire('quay.io').then((r) => (a3 = r));
  await flush();
  t.equal(a3, undefined, 'a third holder of quay.io waits');
  t.equal(sem.active('quay.io'), 2);
  t.equal(sem.waiting('quay.io'), 1);
  const b1 = await sem.acquire('registry.redhat.io');
  const b2 = await sem.acquire('registry.redhat.io');
  t.equal(sem.active('registry.redhat.io'), 2, 'another key is not held up');
  a1();
  a1();
  await p3;
  t.ok(a3, 'the waiter got the released slot');
  t.equal(sem.active('quay.io'), 2, 'a double release frees one slot, not two');
  a2();
  a3!();
  b1();
  b2();
  t.equal(sem.active('quay.io'), 0);
  t.equal(sem.active('registry.redhat.io'), 0);
  t.throws(() => createKeyedSemaphore(0), RangeError);
});

t.test('keyed semaphore waiters are served FIFO; an aborted waiter leaves the line', async (t) => {
  const sem = createKeyedSemaphore(1);
  const held = await sem.acquire('h');
  const order: string[] = [];
  const ac = new AbortController();
  const w1 = sem.acquire('h').then((r) => (order.push('w1'), r));
  const w2 = sem.acquire('h', ac.signal).then((r) => (order.push('w2'), r));
  const w3 = sem.acquire('h').then((r) => (order.push('w3'), r));
  ac.abort(new Error('Module deleted'));
  await t.rejects(w2, /Module deleted/);
  t.equal(sem.waiting('h'), 2);
  held();
  (await w1)();
  (await w3)();
  t.same(order, ['w1', 'w3']);
  await t.rejects(sem.acquire('h', AbortSignal.abort(new Error('gone'))), /gone/);
  t.equal(sem.active('h'), 0);
});

t.test('with the pool: concurrency 6 over two hosts, at most 2 per host at once', async (t) => {
  const q = new WorkQueue();
  const sem = createKeyedSemaphore(2);
  const perHost = new Map<string, number>();
  let peakTotal = 0;
  let peakHost = 0;
  let total = 0;
  const pool = createWorkerPool({
    queue: q,
    concurrency: 6,
    logger: silent,
    handler: async (key, signal) => {
      const host = key.split('/')[0]!;
      const release = await sem.acquire(host, signal);
      try {
        perHost.set(host, (perHost.get(host) ?? 0) + 1);
        total++;
        peakHost = Math.max(peakHost, perHost.get(host)!);
        peakTotal = Math.max(peakTotal, total);
        for (let i = 0; i < 5; i++) await flush();
        return 'done';
      } finally {
        perHost.set(host, perHost.get(host)! - 1);
        total--;
        release();
      }
    },
  });
  pool.start();
  for (let i = 0; i < 12; i++) q.add(`${i % 2 ? 'quay.io' : 'ghcr.io'}/m${i}`);
  await until('all done', () => pool.completed === 12);
  t.equal(peakHost, 2, 'never more than 2 per host');
  t.equal(peakTotal, 4, 'both hosts at their cap together');
  await pool.close();
});
