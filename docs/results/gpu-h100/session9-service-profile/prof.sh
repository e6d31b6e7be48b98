set -u
pip install -q --no-deps --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" >> $OUT/gpu.txt
python3 -c "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))" bench service --device cuda --requests 3000 --rounds 1 --concurrency 1,16 --work-dir /tmp/bw --json $OUT/bench-service.json > $OUT/bench.log 2>&1 &
BP=$!
pid=""
for i in $(seq 1 400); do pid=$(pgrep -f "app.cli serve --no-worker" | head -1); [ -n "$pid" ] && grep -q "raw: single" $OUT/bench.log && break; sleep 0.5; done
/tmp/site/bin/py-spy record -p $pid -r 200 -d 12 --idle -f raw -o $OUT/srv-c1.txt > $OUT/pyspy.log 2>&1
for i in $(seq 1 400); do grep -q "raw: pipelined" $OUT/bench.log && break; sleep 0.5; done
/tmp/site/bin/py-spy record -p $pid -r 200 -d 10 --idle -f raw -o $OUT/srv-c16.txt >> $OUT/pyspy.log 2>&1
wait $BP
cp /tmp/bw/service.log $OUT/ 2>/dev/null; tail -c 3000 $OUT/service.log > $OUT/service-tail.log; rm -f $OUT/service.log
tail -20 $OUT/bench.log
