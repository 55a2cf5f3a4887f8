/**
 * Prometheus metrics of the validation controller, in the API server's registry so that one
 * `/metrics` serves both.
 */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export interface ControllerMetrics {
  readonly stageDuration: Histogram<'stage'>;
  readonly outcomes: Counter<'status' | 'code'>;
  readonly statusWrites: Counter;
}

export interface ControllerMetricSources {
  queued(): number;
  running(): number;
  registryBytes(): number;
}

/** Registers the controller's metrics; gauges read `sources` when scraped. */
export function createControllerMetrics(registry: Registry, sources: ControllerMetricSources): ControllerMetrics {
  new Gauge({
    name: 'kmm_preflight_validation_queue_depth',
    help: 'Module validations waiting in the work queue.',
    registers: [registry],
    collect() {
      this.set(sources.queued());
    },
  });
  new Gauge({
    name: 'kmm_preflight_validations_in_flight',
    help: 'Module validations running now.',
    registers: [registry],
    collect() {
      this.set(sources.running());
    },
  });
  new Gauge({
    name: 'kmm_preflight_registry_received_bytes',
    help: 'Bytes received from image registries since start.',
    registers: [registry],
    collect() {
      this.set(sources.registryBytes());
    },
  });
  return {
    stageDuration: new Histogram({
      name: 'kmm_preflight_stage_duration_seconds',
      help: 'Duration of a validation stage for one Module.',
      labelNames: ['stage'],
      buckets: [0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
      registers: [registry],
    }),
    outcomes: new Counter({
      name: 'kmm_preflight_validation_outcomes_total',
      help: 'Module validations by verdict and reason code.',
      labelNames: ['status', 'code'],
      registers: [registry],
    }),
    statusWrites: new Counter({
      name: 'kmm_preflight_status_writes_total',
      help: 'Status writes of validation objects.',
      registers: [registry],
    }),
  };
}
