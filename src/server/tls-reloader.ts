/**
 * Serving-certificate reload without a restart: the certificate and key files (a mounted Secret,
 * replaced by symlink swaps) are checked on an interval, and a changed pair, or a changed set of
 * trusted client CAs, becomes the secure context of every new connection. Open connections keep
 * theirs, so nothing is dropped.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { Server } from 'node:https';
import { createSecureContext } from 'node:tls';
import type { Logger } from 'pino';

export interface TlsReloaderOptions {
  readonly server: Pick<Server, 'setSecureContext'>;
  readonly certFile: string;
  readonly keyFile: string;
  /** PEM bundles of every CA whose client certificates the server accepts. */
  readonly clientCas: () => readonly string[];
  readonly intervalMs: number;
  readonly logger: Logger;
}

export interface TlsReloader {
  /** Checks now; resolves true when a new context was installed. */
  check(): Promise<boolean>;
  stop(): void;
}

export function startTlsReloader(o: TlsReloaderOptions): TlsReloader {
  let applied = '';
  let running: Promise<boolean> | undefined;
  const check = async (): Promise<boolean> => {
    const [cert, key] = await Promise.all([readFile(o.certFile), readFile(o.keyFile)]);
    const ca = o.clientCas().filter((c) => c.trim() !== '');
    const fingerprint = createHash('sha256').update(cert).update(key).update(ca.join('\n')).digest('hex');
    if (fingerprint === applied) return false;
    // A half-written pair (certificate of the new key, key of the old) fails here and is retried.
    createSecureContext({ cert, key, ...(ca.length > 0 ? { ca } : {}) });
    o.server.setSecureContext({ cert, key, ...(ca.length > 0 ? { ca } : {}), minVersion: 'TLSv1.2' });
    const first = applied === '';
    applied = fingerprint;
    if (!first) o.logger.info({ certFile: o.certFile, clientCas: ca.length }, 'serving certificate or client CAs reloaded');
    return !first;
  };
  const guarded = () => {
    running ??= check()
      .catch((err: unknown) => {
        o.logger.warn({ err, certFile: o.certFile }, 'serving certificate not reloaded; keeping the current one');
        return false;
      })
      .finally(() => (running = undefined));
    return running;
  };
  const timer = setInterval(() => void guarded(), o.intervalMs);
  timer.unref();
  return { check: guarded, stop: () => clearInterval(timer) };
}
