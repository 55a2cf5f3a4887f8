/**
 * The API app built in-process on a temporary SQLite store, for `inject()` tests without a socket.
 * Authentication and authorization are fakes of our own narrow interfaces.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import type { Authenticator, Authorizer, UserInfo } from '../../src/auth/types.ts';
import { build } from '../../src/server/app.ts';
import { createApiMetrics } from '../../src/server/metrics.ts';
import { createRegistries } from '../../src/server/server.ts';
import { openSqliteStore, type SqliteStore } from '../../src/storage/sqlite-store.ts';

export const GV = '/apis/kmm.sigs.x-k8s.io/v1beta2';
export const PFV = `${GV}/preflightvalidations`;
export const PFVO = `${GV}/preflightvalidationsocp`;

export interface TestApp {
  readonly app: FastifyInstance;
  readonly store: SqliteStore;
  close(): Promise<void>;
}

export interface TestAppOptions {
  readonly user?: UserInfo | null;
  readonly authorizer?: Authorizer;
  readonly bookmarkIntervalMs?: number;
}

export async function buildTestApp(o: TestAppOptions = {}): Promise<TestApp> {
  const dir = await mkdtemp(join(tmpdir(), 'kmm-preflight-app-'));
  const store = await openSqliteStore({ path: join(dir, 'db.sqlite'), compactIntervalMs: 0 });
  const logger = pino({ level: 'silent' });
  const user = o.user === undefined ? { username: 'tester', groups: ['system:masters', 'system:authenticated'] } : o.user;
  const authenticator: Authenticator = {
    authenticate: async () => (user ? { authenticated: true, user } : { authenticated: false, reason: 'no credentials' }),
  };
  const app = await build({
    registries: createRegistries(store, logger, { bookmarkIntervalMs: o.bookmarkIntervalMs ?? 60_000 }),
    store,
    logger,
    authenticator,
    authorizer: o.authorizer ?? { authorize: async () => ({ allowed: true, reason: '' }) },
    metrics: createApiMetrics({ collectProcessMetrics: false }),
    version: '0.1.0',
  });
  await app.ready();
  return {
    app,
    store,
    close: async () => {
      await app.close();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

export const pfv = (name: string, extra: Record<string, unknown> = {}) => ({
  apiVersion: 'kmm.sigs.x-k8s.io/v1beta2',
  kind: 'PreflightValidation',
  metadata: { name, ...((extra['metadata'] as object) ?? {}) },
  spec: { kernelVersion: '6.1.0-18-amd64', ...((extra['spec'] as object) ?? {}) },
});

export const JSON_HEADERS = { 'content-type': 'application/json' };

export function lines(body: string): { type: string; object: Record<string, any> }[] {
  return body
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l));
}
