/**
 * Manual time for tests of timer-driven code (work queue, worker pool): timers fire only in
 * `advance`, in deadline order, with promise continuations run between them.
 */
import type { Clock } from '../../src/controller/work-queue.ts';

/** Lets pending promise continuations and immediates run. */
export const flush = () => new Promise<void>((r) => setImmediate(r));

export class FakeClock implements Clock {
  t: number;
  #seq = 0;
  readonly #timers = new Map<number, { at: number; fn: () => void }>();
  constructor(start = 0) {
    this.t = start;
  }
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    const id = ++this.#seq;
    this.#timers.set(id, { at: this.t + Math.max(0, ms), fn });
    return id;
  }
  clearTimeout(handle: unknown): void {
    this.#timers.delete(handle as number);
  }
  /** Timers not fired yet. */
  get pending(): number {
    return this.#timers.size;
  }
  async advance(ms: number): Promise<void> {
    const target = this.t + ms;
    for (;;) {
      await flush();
      let next: [number, { at: number; fn: () => void }] | undefined;
      for (const entry of this.#timers) if (entry[1].at <= target && (!next || entry[1].at < next[1].at)) next = entry;
      if (!next) break;
      this.#timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = target;
    await flush();
  }
}
