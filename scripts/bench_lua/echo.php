<?php
// Benchmark case "echo": answer with the request body (the same as echo.lua).
echo file_get_contents('php://input');
