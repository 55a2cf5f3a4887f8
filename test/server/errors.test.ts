import { readFile } from 'node:fs/promises';
import t from 'tap';
import { ApiError, STATUS_REASONS, errors } from '../../src/server/errors.ts';
import { ROOT } from '../helpers/server.ts';

t.test('the error catalogue and docs/errors.md list the same reasons with the same codes', async (t) => {
  const doc = await readFile(`${ROOT}/docs/errors.md`, 'utf8');
  const rows = new Map([...doc.matchAll(/^\| (\w+) \| (\d{3}) \|/gm)].map((m) => [m[1]!, Number(m[2])]));
  t.same(Object.fromEntries(rows), { ...STATUS_REASONS });
});

t.test('an ApiError becomes a Status object with reason, code and details', async (t) => {
  const s = errors.notFound({ group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidations' }, 'x').toStatus();
  t.same(s, {
    kind: 'Status',
    apiVersion: 'v1',
    metadata: {},
    status: 'Failure',
    message: 'preflightvalidations.kmm.sigs.x-k8s.io "x" not found',
    reason: 'NotFound',
    details: { name: 'x', group: 'kmm.sigs.x-k8s.io', kind: 'preflightvalidations' },
    code: 404,
  });
});

t.test('an invalid object names each field in the message and the causes', async (t) => {
  const e = errors.invalid({ group: 'kmm.sigs.x-k8s.io', resource: 'preflightvalidations' }, 'PreflightValidation', 'p', [
    { reason: 'FieldValueInvalid', message: 'Invalid value: "tesdt": bad', field: 'spec.kernelVersion' },
  ]);
  t.equal(e.code, 422);
  t.equal(e.message, 'PreflightValidation.kmm.sigs.x-k8s.io "p" is invalid: spec.kernelVersion: Invalid value: "tesdt": bad');
});

t.test('wrapping keeps the cause', async (t) => {
  const cause = new Error('disk full');
  const e = errors.internal('write failed', cause);
  t.ok(e instanceof ApiError);
  t.equal(e.cause, cause);
});
