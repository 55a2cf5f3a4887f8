import t from 'tap';
import { negotiate } from '../../src/server/negotiation.ts';

t.test('a protobuf-first Accept gets JSON, not 406', async (t) => {
  const n = negotiate('application/vnd.kubernetes.protobuf, */*', 'get');
  t.equal(n.mediaType, 'application/json');
  t.equal(n.shape.kind, 'object');
  t.equal(negotiate('application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1;g=meta.k8s.io,application/json', 'list').shape.kind, 'table');
});

t.test('kubectl get asks for a Table, falling back to JSON', async (t) => {
  const n = negotiate('application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json', 'list');
  t.same(n.shape, { kind: 'table', version: 'v1' });
  t.equal(n.contentType, 'application/json;as=Table;g=meta.k8s.io;v=v1');
});

t.test('PartialObjectMetadata for get and PartialObjectMetadataList for list', async (t) => {
  t.same(negotiate('application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1', 'get').shape, { kind: 'partial', version: 'v1' });
  t.same(negotiate('application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json', 'list').shape, { kind: 'partialList', version: 'v1' });
});

t.test('aggregated discovery v2 with its exact content type', async (t) => {
  const n = negotiate('application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json', 'discovery');
  t.equal(n.contentType, 'application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList');
  t.same(negotiate('application/json', 'discovery').shape, { kind: 'object' });
});

t.test('nothing producible is 406 NotAcceptable', async (t) => {
  t.throws(() => negotiate('application/vnd.kubernetes.protobuf', 'get'), { reason: 'NotAcceptable', code: 406 });
  t.throws(() => negotiate('text/html', 'get'), { code: 406 });
});
