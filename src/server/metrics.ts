/**
 * Prometheus metrics of the API server, in a registry of its own (never prom-client's global one,
 * so that several servers in one process, as in tests, do not collide).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export interface ApiMetrics {
  readonly registry: Registry;
  readonly requests: Counter<'verb' | 'resource' | 'subresource' | 'code'>;
  readonly requestDuration: Histogram<'verb' | 'resource'>;
  readonly watchers: Gauge<'resource'>;
  readonly watchEvents: Counter<'resource' | 'type'>;
}

export function createApiMetrics(options: { collectProcessMetrics?: boolean } = {}): ApiMetrics {
  const registry = new Registry();
  if (options.collectProcessMetrics !== false) collectDefaultMetrics({ register: registry, prefix: 'kmm_preflight_' });
  return {
    registry,
    requests: new Counter({
      name: 'kmm_preflight_apiserver_requests_total',
      help: 'API requests by verb, resource, subresource and HTTP code.',
      labelNames: ['verb', 'resource', 'subresource', 'code'],
      registers: [registry],
    }),
    requestDuration: new Histogram({
      name: 'kmm_preflight_apiserver_request_duration_seconds',
      help: 'Time to answer an API request (watches excluded).',
      labelNames: ['verb', 'resource'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers: [registry],
    }),
    watchers: new Gauge({
      name: 'kmm_preflight_apiserver_watchers',
      help: 'Open watch streams by resource.',
      labelNames: ['resource'],
      registers: [registry],
    }),
    watchEvents: new Counter({
      name: 'kmm_preflight_apiserver_watch_events_total',
      help: 'Watch events sent by resource and type.',
      labelNames: ['resource', 'type'],
      registers: [registry],
    }),
  };
}
