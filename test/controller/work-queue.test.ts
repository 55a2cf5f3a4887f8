/**
 * The work queue's client-go semantics, one behaviour per test, with a fake clock where time
 * matters (delays, backoff, drain timeouts).
 */
import t from 'tap';
import { FakeClock, flush } from '../helpers/fake-clock.ts';
import { exponentialBackoff, QueueFullError, QueueShutDownError, WorkQueue } from '../../src/controller/work-queue.ts';

/** Lets every pending promise continuation run. */

/** A small deterministic PRNG so the concurrency test is reproducible. */
function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

t.test('add de-duplicates a waiting key, and keys are handed out FIFO', async (t) => {
  const q = new WorkQueue();
  q.add('a');
  q.add('b');
  q.add('a');
  q.add('c');
  q.add('b');
  t.equal(q.len, 3, 'three distinct keys wait');
  t.equal(await q.get(), 'a');
  t.equal(await q.get(), 'b');
  t.equal(await q.get(), 'c');
  t.equal(q.len, 0);
  t.equal(q.processing, 3, 'the keys handed out are processing');
});

t.test('a key being processed is not handed out again; added meanwhile, it is queued once after done', async (t) => {
  const q = new WorkQueue();
  q.add('a');
  t.equal(await q.get(), 'a');
  q.add('a');
  q.add('a');
  t.equal(q.len, 0, 'not ready while it is processing');
  let second: string | undefined;
  const p = q.get().then((k) => (second = k));
  await flush();
  t.equal(second, undefined, 'a second worker does not get it');
  q.done('a');
  await p;
  t.equal(second, 'a', 'queued again once done');
  q.done('a');
  t.equal(q.len, 0, 'the two adds during processing made one more run, not two');
  t.equal(q.processing, 0);
  t.equal(q.size, 0);
});

t.test('per-key serialisation under concurrency: never two handlers for a key, and no add is lost', async (t) => {
  const q = new WorkQueue();
  const random = lcg(42);
  const keys = ['k0', 'k1', 'k2', 'k3', 'k4'];
  const active = new Map<string, number>();
  const lastAdd = new Map<string, number>();
  const lastStart = new Map<string, number>();
  let seq = 0;
  let maxPerKey = 0;
  let maxTotal = 0;
  let runs = 0;
  const ticks = async (n: number) => {
    for (let i = 0; i < n; i++) await flush();
  };
  const worker = async () => {
    for (;;) {
      let key: string;
      try {
        key = await q.get();
      } catch {
        return;
      }
      runs++;
      lastStart.set(key, ++seq);
      active.set(key, (active.get(key) ?? 0) + 1);
      maxPerKey = Math.max(maxPerKey, active.get(key)!);
      maxTotal = Math.max(maxTotal, [...active.values()].reduce((a, b) => a + b, 0));
      await ticks(1 + Math.floor(random() * 4));
      active.set(key, active.get(key)! - 1);
      q.done(key);
    }
  };
  const workers = Array.from({ length: 8 }, () => worker());
  for (let i = 0; i < 400; i++) {
    const key = keys[Math.floor(random() * keys.length)]!;
    q.add(key);
    lastAdd.set(key, ++seq);
    if (random() < 0.5) await ticks(1);
  }
  while (q.len > 0 || q.processing > 0) await flush();
  q.shutDown();
  await Promise.all(workers);
  t.equal(maxPerKey, 1, 'a key never ran twice at once');
  t.ok(maxTotal > 1, `keys did run in parallel (up to ${maxTotal})`);
  for (const key of keys) t.ok((lastStart.get(key) ?? 0) > (lastAdd.get(key) ?? 0), `${key} ran after its last add`);
  t.ok(runs < 400, `adds were coalesced (${runs} runs for 400 adds)`);
});

t.test('get waits for the next key; waiting getters are served in order', async (t) => {
  const q = new WorkQueue();
  const got: string[] = [];
  const g1 = q.get().then((k) => got.push(`1:${k}`));
  const g2 = q.get().then((k) => got.push(`2:${k}`));
  await flush();
  t.same(got, [], 'nothing yet');
  q.add('x');
  q.add('y');
  await Promise.all([g1, g2]);
  t.same(got, ['1:x', '2:y']);
  t.equal(q.processing, 2);
});

t.test('an aborted get rejects with the reason and consumes no key', async (t) => {
  const q = new WorkQueue();
  const ac = new AbortController();
  const p = q.get(ac.signal);
  ac.abort(new Error('stop waiting'));
  await t.rejects(p, /stop waiting/);
  q.add('a');
  t.equal(q.len, 1, 'the key went to the queue, not to the aborted getter');
  await t.rejects(q.get(AbortSignal.abort(new Error('already'))), /already/, 'an already aborted signal rejects at once');
  t.equal(q.len, 1);
});

t.test('addAfter makes a key ready after its delay; the earlier deadline wins', async (t) => {
  const clock = new FakeClock();
  const q = new WorkQueue({ clock });
  q.addAfter('a', 1000);
  t.equal(q.len, 0);
  t.equal(q.delayed, 1);
  await clock.advance(999);
  t.equal(q.len, 0, 'not before the delay');
  await clock.advance(1);
  t.equal(q.len, 1, 'ready at the delay');
  t.equal(q.delayed, 0);

  q.addAfter('b', 5000);
  q.addAfter('b', 2000);
  q.addAfter('b', 9000);
  t.equal(q.delayed, 1, 'one delayed entry per key');
  await clock.advance(2000);
  t.equal(q.len, 2, 'b is ready at the earliest deadline');
  await clock.advance(10_000);
  t.equal(q.len, 2, 'and only once');

  q.addAfter('c', 0);
  t.equal(q.len, 3, 'no delay: added at once');

  // A delayed key that comes due while processing waits for done, as add does.
  t.equal(await q.get(), 'a');
  q.addAfter('a', 100);
  await clock.advance(100);
  t.equal(q.len, 2, 'a is not ready while processing');
  q.done('a');
  t.equal(q.len, 3, 'queued once done');
  t.equal(clock.pending, 0, 'no timers left behind');
});

t.test('addRateLimited backs off exponentially from 500 ms up to the 5 minute cap', async (t) => {
  const clock = new FakeClock();
  // random() = 0: no jitter taken off, so the delays are exact.
  const q = new WorkQueue({ clock, backoff: { random: () => 0 } });
  const expected = [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000, 300_000];
  for (const [i, delay] of expected.entries()) {
    q.addRateLimited('k');
    t.equal(q.retries('k'), i + 1, `retry ${i + 1} counted`);
    await clock.advance(delay - 1);
    t.equal(q.len, 0, `retry ${i + 1}: not ready after ${delay - 1} ms`);
    await clock.advance(1);
    t.equal(q.len, 1, `retry ${i + 1}: ready after ${delay} ms`);
    q.done(await q.get());
  }
});

t.test('jitter takes at most 20 % off the exponential delay, and does spread retries', async (t) => {
  for (const [retry, full] of [[0, 500], [3, 4000], [20, 300_000]] as const) {
    const low = exponentialBackoff({ random: () => 0.999999 });
    const high = exponentialBackoff({ random: () => 0 });
    for (let i = 0; i < retry; i++) {
      low.when('k');
      high.when('k');
    }
    const lo = low.when('k');
    t.ok(lo >= 0.8 * full && lo < 0.8 * full + 1, `retry ${retry}: the lowest delay is 80 % of ${full} (${lo})`);
    t.equal(high.when('k'), full, `retry ${retry}: the highest delay is ${full}`);
  }
  const samples: number[] = [];
  for (let i = 0; i < 500; i++) {
    const b = exponentialBackoff();
    b.when('k');
    samples.push(b.when('k')); // the second retry: 1000 ms before jitter
  }
  t.ok(samples.every((d) => d >= 800 && d <= 1000), 'every sample within [800, 1000] ms');
  t.ok(new Set(samples.map((d) => Math.round(d))).size > 50, 'and they differ');

  // Through the queue, with a fixed random: 500 ms less 20 % of half = 450 ms.
  const clock = new FakeClock();
  const q = new WorkQueue({ clock, backoff: { random: () => 0.5 } });
  q.addRateLimited('k');
  await clock.advance(449);
  t.equal(q.len, 0);
  await clock.advance(1);
  t.equal(q.len, 1, 'ready at 450 ms');
  t.throws(() => exponentialBackoff({ jitter: 1 }), RangeError);
  t.throws(() => exponentialBackoff({ baseDelayMs: 10, maxDelayMs: 5 }), RangeError);
});

t.test('forget resets the backoff of a key, and only of that key', async (t) => {
  const clock = new FakeClock();
  const q = new WorkQueue({ clock, backoff: { random: () => 0, baseDelayMs: 100 } });
  for (let i = 0; i < 3; i++) {
    q.addRateLimited('a');
    q.addRateLimited('b');
    await clock.advance(100 * 2 ** i);
    q.done(await q.get());
    q.done(await q.get());
  }
  t.equal(q.retries('a'), 3);
  q.forget('a');
  t.equal(q.retries('a'), 0, 'a is forgotten');
  t.equal(q.retries('b'), 3, 'b is not');
  q.addRateLimited('a');
  await clock.advance(100);
  t.equal(q.len, 1, 'a is back to the base delay');
});

t.test('maxLength: a new key beyond it throws QueueFullError; held keys can always be re-queued', async (t) => {
  const q = new WorkQueue({ maxLength: 2, name: 'validations' });
  q.add('a');
  q.add('b');
  const err = t.throws(() => q.add('c')) as QueueFullError;
  t.type(err, QueueFullError);
  t.match(err, { key: 'c', maxLength: 2, message: 'work queue validations is full (2 keys): cannot add c' });
  t.doesNotThrow(() => q.add('a'), 'a duplicate is not a new key');
  t.throws(() => q.addAfter('c', 100), QueueFullError, 'addAfter counts too');
  t.throws(() => q.addRateLimited('c'), QueueFullError, 'and addRateLimited');
  t.equal(q.retries('c'), 0, 'a refused key counts no retry');
  t.equal(await q.get(), 'a');
  t.throws(() => q.add('c'), QueueFullError, 'a processing key still counts');
  t.doesNotThrow(() => q.add('a'), 'the processing key can be added again');
  t.doesNotThrow(() => q.addRateLimited('a'), 'and retried');
  t.equal(q.size, 2);
  q.done('a');
  t.equal(await q.get(), 'b');
  t.equal(await q.get(), 'a');
  q.done('a');
  q.done('b');
  t.equal(q.size, 1, 'a is still delayed by its retry');
  t.doesNotThrow(() => q.add('c'), 'room again');
  t.throws(() => new WorkQueue({ maxLength: 0 }), RangeError);
});

t.test('shutDown rejects waiting and later getters, ignores adds and drops delayed keys', async (t) => {
  const clock = new FakeClock();
  const q = new WorkQueue({ clock, name: 'q' });
  const waiting = q.get();
  q.addAfter('later', 1000);
  q.shutDown();
  await t.rejects(waiting, QueueShutDownError, 'a waiting getter rejects');
  await t.rejects(q.get(), { name: 'QueueShutDownError', message: 'work queue q is shut down' }, 'a later getter too');
  q.add('x');
  q.addRateLimited('y');
  t.equal(q.len, 0, 'adds are ignored');
  t.equal(clock.pending, 0, 'the delay timer is cleared');
  t.equal(q.shuttingDown, true);
});

t.test('shutDownWithDrain waits for keys in flight to be done, bounded by its timeout', async (t) => {
  const clock = new FakeClock();
  const q = new WorkQueue({ clock });
  q.add('a');
  q.add('b');
  const a = await q.get();
  const b = await q.get();
  let drained: boolean | undefined;
  const p = q.shutDownWithDrain(5000).then((r) => (drained = r));
  await t.rejects(q.get(), QueueShutDownError, 'no new keys during the drain');
  q.done(a);
  await clock.advance(1000);
  t.equal(drained, undefined, 'still waiting for b');
  q.done(b);
  await p;
  t.equal(drained, true, 'drained once both are done');

  const q2 = new WorkQueue({ clock });
  q2.add('stuck');
  await q2.get();
  const p2 = q2.shutDownWithDrain(5000);
  await clock.advance(5000);
  t.equal(await p2, false, 'false after the timeout');
  t.equal(await new WorkQueue().shutDownWithDrain(), true, 'nothing in flight: drained at once');
});
